"""The one error root of the export stage.

Every failure the user can act on (a bad checkpoint, an occupied output folder, a tensor missing from
the safetensors files, a MiniGPT-4 file that cannot be converted, graphs that disagree with eager
PyTorch) is an ExportError or a subclass, with a message that says what is wrong, with which input,
and what to do; `python -m vlm_core.export` prints it as one `error:` line (export/cli.py).
"""
from __future__ import annotations


class ExportError(Exception):
    """The export cannot proceed; the message says why and what to do."""
