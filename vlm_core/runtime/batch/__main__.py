"""`python -m vlm_core.runtime.batch -m OUT -i requests.jsonl -o results.jsonl`."""
import sys

from vlm_core.runtime.batch.cli import main

sys.exit(main())
