"""`python -m export SRC -o OUT`: see export/cli.py."""
import sys

from .cli import main

sys.exit(main())
