"""`python -m runtime.serve`: the same as `python -m runtime.server` (kept for existing commands and imports).

The server lives in the runtime/server/ package; see its docstring.
"""
from __future__ import annotations

import sys

from .server import ServeConfig, main


def __getattr__(name: str):
    if name == "create_app":  # imported on use: it needs the 'serve' extra (starlette)
        from .server.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ServeConfig", "create_app", "main"]

if __name__ == "__main__":
    sys.exit(main(prog="python -m runtime.serve"))
