"""The ingress of the scaled-out server: the same routes as the plain server, each request forwarded whole to
the replica the router picks, its answer streamed back as the replica makes it.

Ray-agnostic: `build_ingress_app(send, replicas)` takes two coroutines (deployments.py gives Ray's):
``send(method, target, headers, body, routing)`` -> an async iterator of the replica's response (a start
{"status", "headers"} then bytes), and ``replicas()`` -> the replica ids now known. The ingress parses nothing
but what routing needs (routing_key over the JSON body, affinity.py): every check, error and answer is the
replica's, the plain server's code. `/health` and `/metrics` ask every replica (pinned requests) and answer
for the whole application: healthy while one replica is, and one metrics page with a ``replica`` label.

A replica that fails before answering (its actor died) gives a 503 naming it; one that fails mid-stream ends
the stream with an OpenAI error event, so a client never hangs on a dead replica.
"""
from __future__ import annotations

import asyncio
import json
import logging

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vlm_core.runtime.cluster.affinity import RoutingKey, routing_key
from vlm_core.runtime.cluster.replica import REPLICA_HEADER
from vlm_core.runtime.server.app import DisconnectAwareStreamingResponse

log = logging.getLogger("vlm_core.runtime.cluster")
HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "host"}
FAN_OUT_TIMEOUT_S = 30.0  # /health and /metrics: a replica slower than this is reported as not answering


def _error(status: int, message: str, code: str) -> dict:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": code}}


def _request_headers(request: Request) -> list:
    return [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_HEADERS]


async def _whole(parts) -> tuple[int, dict, bytes]:
    """(status, headers, body) of a replica's whole response."""
    status, headers, chunks = 502, {}, []
    async for part in parts:
        if isinstance(part, dict):
            status, headers = part["status"], {k.lower(): v for k, v in part["headers"]}
        else:
            chunks.append(part)
    return status, headers, b"".join(chunks)


def build_ingress_app(send, replicas) -> Starlette:
    """The ingress Starlette app over `send` and `replicas` (see the module docstring)."""

    async def forward(request: Request, routing: RoutingKey, body: bytes) -> Response:
        path, root = request.scope["path"], request.scope.get("root_path", "")
        path = path[len(root):] if root and path.startswith(root) else path  # mounted under a route prefix
        target = (path or "/") + (f"?{request.url.query}" if request.url.query else "")
        parts = send(request.method, target, _request_headers(request), body, routing.to_dict())
        iterator = parts.__aiter__()
        try:
            start = await iterator.__anext__()
        except Exception as e:  # noqa: BLE001 (any failure of the replica or the path to it: answered 503)
            log.warning("replica failed before answering: %s", e)
            return JSONResponse(_error(503, f"the replica serving this request failed before answering "
                                            f"({type(e).__name__}: {e}); retry", "replica_failed"), 503)
        headers = {k: v for k, v in start["headers"] if k.lower() not in HOP_HEADERS}
        event_stream = headers.get("content-type", "").startswith("text/event-stream")

        async def rest():
            try:
                async for chunk in iterator:
                    yield chunk
            except Exception as e:  # noqa: BLE001 (mid-answer: the stream ends with an error event)
                log.warning("replica %s failed mid-answer: %s", headers.get(REPLICA_HEADER), e)
                if event_stream:
                    error = _error(503, f"the replica serving this stream failed ({type(e).__name__}); retry",
                                   "replica_failed")
                    yield ("data: " + json.dumps(error) + "\n\n").encode()
            finally:
                close = getattr(iterator, "aclose", None)
                if close is not None:
                    await close()

        return DisconnectAwareStreamingResponse(rest(), status_code=start["status"], headers=headers)

    async def chat_completions(request: Request) -> Response:
        body = await request.body()
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None  # the replica answers the 400
        return await forward(request, routing_key(parsed, dict(request.headers)), body)

    async def anywhere(request: Request) -> Response:
        return await forward(request, RoutingKey(), await request.body())

    async def ask_each(target: str) -> dict:
        """{replica: (status, headers, body) or an exception} for GET `target` on every replica."""
        known = await replicas()

        async def one(replica: str):
            parts = send("GET", target, [], b"", RoutingKey(replica=replica).to_dict())
            answer = await asyncio.wait_for(_whole(parts), FAN_OUT_TIMEOUT_S)
            if answer[1].get(REPLICA_HEADER) != replica:  # it left between listing and asking
                raise ConnectionError(f"replica {replica} is gone (answered by {answer[1].get(REPLICA_HEADER)})")
            return answer

        answers = await asyncio.gather(*(one(r) for r in known), return_exceptions=True)
        return dict(zip(known, answers))

    async def health(request: Request) -> Response:
        answers = await ask_each("/health")
        report = {}
        for replica, answer in answers.items():
            if isinstance(answer, BaseException):
                report[replica] = {"status": "unreachable", "error": f"{type(answer).__name__}: {answer}"}
            else:
                report[replica] = json.loads(answer[2]) if answer[0] == 200 else {"status": f"http {answer[0]}"}
        healthy = sum(1 for r in report.values() if r.get("status") == "ok")
        status = "ok" if healthy == len(report) and report else ("degraded" if healthy else "unavailable")
        return JSONResponse({"status": status, "replicas_healthy": healthy, "replicas": report},
                            status_code=200 if healthy else 503)

    async def metrics(request: Request) -> Response:
        from vlm_core.runtime.cluster.merged_metrics import merge

        answers = await ask_each("/metrics")
        pages = {r: a[2].decode() for r, a in answers.items() if not isinstance(a, BaseException) and a[0] == 200}
        if not pages:
            return JSONResponse(_error(503, "no replica answered /metrics", "replica_failed"), 503)
        return Response(merge(pages), media_type="text/plain; version=0.0.4; charset=utf-8")

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/{path:path}", anywhere, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]),
    ]
    return Starlette(routes=routes)
