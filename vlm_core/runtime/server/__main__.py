import sys

from vlm_core.runtime.server.cli import main

sys.exit(main())
