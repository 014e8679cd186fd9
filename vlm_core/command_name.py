"""The name a command was started by, for its usage and error lines: `vlm-generate` or `python -m ...`."""
from __future__ import annotations

import os
import sys


def command_name(script: str, module: str) -> str:
    """`script` (e.g. "vlm-generate") when the process was started as that console script, else
    `python -m <module>`: what the user typed, so that help and error lines can be pasted back."""
    if os.path.basename(sys.argv[0] or "") == script:
        return script
    return f"python -m {module}"
