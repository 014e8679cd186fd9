"""`python -m vlm_core.export SRC -o OUT`: see export/cli.py."""
import sys

from vlm_core.export.cli import main

sys.exit(main())
