"""One model replica: the plain server's app over one engine and one export folder, answering forwarded
HTTP requests in-process. Ray-agnostic (deployments.py wraps it in a Ray Serve deployment).

Every request the ingress forwards is answered by `create_app`'s app itself (runtime/server/asgi_call.py), so
a replica's answers, errors, streaming and `/metrics` are the plain server's; each response also names the
replica that made it (``x-vlm-replica``), so clients and tests can see the routing.

    replica = ModelReplica(ServeConfig(model="out/"), replica_id="r1")
    async for part in replica.handle("POST", "/v1/chat/completions", headers, body):
        ...   # {"status", "headers"} first, then bytes
"""
from __future__ import annotations

from vlm_core.runtime.server.asgi_call import call
from vlm_core.runtime.server.config import ServeConfig

REPLICA_HEADER = "x-vlm-replica"


class ModelReplica:
    """The app of one replica.

    Args:
        config: the server's settings (the model folder must exist on this replica's host, at this path).
        replica_id: how responses name this replica.
        app: an app already built (tests); default: `create_app(config)`, which loads the model.
    """

    def __init__(self, config: ServeConfig, replica_id: str, app=None):
        if app is None:
            from vlm_core.runtime.server.app import create_app

            app = create_app(config)
        self.app, self.replica_id, self.config = app, replica_id, config

    async def handle(self, method: str, target: str, headers: list, body: bytes = b""):
        """Answer one forwarded request: yields the response start (with ``x-vlm-replica``) then body chunks."""
        async for part in call(self.app, method, target, headers, body):
            if isinstance(part, dict):
                part = {"status": part["status"], "headers": [*part["headers"], (REPLICA_HEADER, self.replica_id)]}
            yield part

    def close(self) -> None:
        """Stop the replica's scheduler (queued requests cancelled, running ones stop at their next token)."""
        self.app.state.scheduler.close()
