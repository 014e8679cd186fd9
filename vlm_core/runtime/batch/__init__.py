"""OpenAI batch files: a JSONL file of chat-completions requests in, a JSONL file of answers out
(`vlm-batch -m OUT -i requests.jsonl -o results.jsonl`, or `python -m vlm_core.runtime.batch`).

The format is OpenAI's Batch API, as vLLM's `run_batch` reads and writes it (lines.py). Every body is
answered by the server's own app in this process (runner.py), so an answer equals the server's for the same
body; requests run concurrently through one engine. A bad line becomes that line's error and the rest go on.
Answers are appended to OUT.partial as they complete and OUT is written whole, atomically, at the end
(results.py); a rerun after a kill skips the custom_ids already answered. Progress goes to stderr
(progress.py). Needs the 'serve' extra (starlette); never imports torch or transformers.
"""
from __future__ import annotations

from vlm_core.runtime.batch.cli import main

__all__ = ["main"]
