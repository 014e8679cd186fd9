"""One HTTP request to an ASGI app in this process, without a socket: the response streamed as it is made.

The batch runner (runtime/batch/) and each Ray Serve replica (runtime/cluster/) answer through the very app
`create_app` builds, so their answers are the server's, byte for byte: same parsing (schema.py), same
errors, same streaming. Closing the iterator early is a client disconnect (the app cancels the generation).

    async for part in call(app, "POST", "/v1/chat/completions", body=json_bytes):
        part          # first {"status": int, "headers": [(name, value), ...]} (str pairs), then bytes chunks

    status, headers, body = await request(app, "GET", "/health")
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

_DONE = object()


def _scope(method: str, target: str, headers: list) -> dict:
    url = urlsplit(target)
    path = url.path or "/"
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": method.upper(), "scheme": "http", "path": path, "raw_path": path.encode(),
            "query_string": url.query.encode(), "root_path": "",
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}


async def call(app, method: str, target: str, headers=(), body: bytes = b"") -> AsyncIterator:
    """Send one request to `app`; yield the response start ({"status", "headers"}) then its body chunks.

    Args:
        app: an ASGI application (a Starlette app from `create_app`).
        method, target: e.g. "POST", "/v1/chat/completions" (a query string may follow).
        headers: (name, value) str pairs; a content-length is added for the body.
        body: the request body, sent whole.
    """
    headers = [(k, v) for k, v in headers if k.lower() != "content-length"] + [("content-length", str(len(body)))]
    outbox: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        await outbox.put(message)

    async def run():
        try:
            await app(_scope(method, target, headers), receive, send)
        finally:
            await outbox.put(_DONE)

    task = asyncio.ensure_future(run())
    started = False
    try:
        while True:
            message = await outbox.get()
            if message is _DONE:
                break
            if message["type"] == "http.response.start":
                started = True
                yield {"status": message["status"],
                       "headers": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    break
    finally:
        disconnected.set()  # the app sees the client go: a generation still running is cancelled
        try:
            await asyncio.wait_for(asyncio.shield(task), 30)
        except asyncio.TimeoutError:
            task.cancel()
    if not started and task.done() and not task.cancelled() and task.exception() is not None:
        raise task.exception()  # the app failed before answering (an answered 500 was already yielded)


async def request(app, method: str, target: str, headers=(), body: bytes = b"") -> tuple[int, dict, bytes]:
    """(status, headers as a dict of lowercase names, the whole body) of one request to `app`."""
    status, response_headers, chunks = 500, {}, []
    async for part in call(app, method, target, headers, body):
        if isinstance(part, dict):
            status, response_headers = part["status"], {k.lower(): v for k, v in part["headers"]}
        else:
            chunks.append(part)
    return status, response_headers, b"".join(chunks)
