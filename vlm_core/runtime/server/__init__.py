"""An OpenAI-compatible HTTP server and a chat page for one exported model (`python -m vlm_core.runtime.server -m OUT`).

Endpoints: ``POST /v1/chat/completions`` (JSON or server-sent events with ``"stream": true``),
``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``, ``GET /metrics`` and the chat page at ``/``
(plain HTML + JS + CSS from runtime/server/static/, nothing from a CDN).

Needs the optional ``serve`` extra (Starlette + uvicorn); the runtime itself stays numpy, onnxruntime,
tokenizers, pillow and jinja2 only. Never imports torch or transformers.

The request path, one idea per module:

* ``schema.py``: the JSON body -> a typed ChatRequest; every refusal names the field (``param``).
* ``images.py``: an image_url -> bytes (``data:`` URLs; ``http(s)`` only with ``--allow-remote-media``;
  never a local path) -> a PIL image, opened by ``kernels.image`` with the pixel limit checked from the
  header before any pixel is decoded.
* ``videos.py``: a video_url (or ``{"type": "video", "video": URL}``) -> bytes, the same way -> the container
  probed (frame count, size) before queueing; frames are decoded on the worker by the engine's ``prepare``.
* ``scheduler.py``: ``--workers`` worker threads and a queue of at most ``--max-queue`` (one more is
  refused at once), the per-request timeout (from arrival, queueing included), cancellation when a
  client goes away. No HTTP in it; it owns its counters.
* ``worker.py``: a ChatRequest + decoded images and videos' bytes -> Prepared, GenerationChunk..., Finished,
  driving ``vlm.prepare`` and ``vlm.stream_generate``.
* ``app.py``: the Starlette routes; one table maps error types to HTTP statuses and OpenAI's error
  shape ``{"error": {"message", "type", "param", "code"}}``.
* ``config.py`` / ``cli.py``: ServeConfig (every default, once) and the command line.
* ``metrics.py``: ``GET /metrics`` in Prometheus' format under vLLM's names (the 'metrics' extra).
* ``asgi_call.py``: one request to the app in-process, no socket (vlm-batch and the Ray replicas answer
  through it, so their answers are the server's).
* ``head_deadline.py``: uvicorn's h11 protocol with a deadline on each request head (--header-timeout).

Auth: with ``--api-key KEY`` every ``/v1/`` route needs ``Authorization: Bearer KEY`` (constant-time
compare); ``/`` and ``/health`` stay open (the page asks for the key and keeps it in the browser). A
non-loopback host without a key is refused unless ``--insecure-no-auth``.

Sampling: ``temperature: 0`` is greedy and gives the tokens ``python -m vlm_core.runtime.generate --greedy``
gives; fields not given take the model's generation_config defaults, as the CLI does.
"""
from __future__ import annotations

from vlm_core.runtime.server.cli import main
from vlm_core.runtime.server.config import ServeConfig


def __getattr__(name: str):
    if name == "create_app":  # imported on use: it needs the 'serve' extra (starlette)
        from vlm_core.runtime.server.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ServeConfig", "create_app", "main"]
