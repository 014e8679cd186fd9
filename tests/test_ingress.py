"""The scale-out ingress (runtime/cluster/ingress.py) without Ray: requests forwarded whole to the replica the
routing picks, /health and /metrics for every replica, and a replica's failure answered, never hung on."""
from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")

from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from vlm_core.runtime.cluster.affinity import AffinityTable, RoutingKey, choose
from vlm_core.runtime.cluster.ingress import build_ingress_app
from vlm_core.runtime.cluster.merged_metrics import merge
from vlm_core.runtime.cluster.replica import ModelReplica
from vlm_core.runtime.server.asgi_call import request


def fake_app(name: str, fail_mid_stream: bool = False) -> Starlette:
    async def chat(req):
        body = await req.json()
        if body.get("stream"):
            async def events():
                yield 'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'
                if fail_mid_stream:
                    raise ConnectionError("actor died")
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return JSONResponse({"served_by": name, "messages": body["messages"]})

    async def health(req):
        return JSONResponse({"status": "ok", "name": name})

    async def metrics(req):
        return PlainTextResponse(f'# HELP vllm:num_requests_waiting w\n# TYPE vllm:num_requests_waiting gauge\n'
                                 f'vllm:num_requests_waiting{{model_name="m"}} {len(name)}\n')

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/health", health), Route("/metrics", metrics)])


class FakeCluster:
    """Two replicas over fake apps, routed by affinity.choose with exact in-flight loads."""

    def __init__(self, dead: set = frozenset(), fail_mid_stream: bool = False):
        self.replicas = {name: ModelReplica(None, name, app=fake_app(name, fail_mid_stream)) for name in ("a", "b")}
        self.table, self.loads, self.dead = AffinityTable(), {"a": 0, "b": 0}, set(dead)
        self.routed = []

    def send(self, method, target, headers, body, routing):
        key = RoutingKey.from_dict(routing)
        name = choose(key, {r: n for r, n in self.loads.items() if r not in self.dead}, self.table).replica
        self.table.record(key, name)
        self.routed.append(name)

        async def parts():
            if name in self.dead:
                raise ConnectionError(f"replica {name} died")
            self.loads[name] += 1
            try:
                async for part in self.replicas[name].handle(method, target, headers, body):
                    yield part
            finally:
                self.loads[name] -= 1
        return parts()

    async def names(self):
        return sorted(self.replicas)


def call(app, method, target, body=None, headers=()):
    data = json.dumps(body).encode() if body is not None else b""
    return asyncio.run(request(app, method, target, [("content-type", "application/json"), *headers], data))


def test_a_follow_up_is_forwarded_to_the_replica_of_its_first_turn():
    cluster = FakeCluster()
    app = build_ingress_app(cluster.send, cluster.names)
    turn = [{"role": "user", "content": "a long first question " * 10}]
    status, headers, body = call(app, "POST", "/v1/chat/completions", {"messages": turn})
    assert status == 200 and json.loads(body)["messages"] == turn
    first = headers["x-vlm-replica"]
    follow = turn + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "and?"}]
    assert call(app, "POST", "/v1/chat/completions", {"messages": follow})[1]["x-vlm-replica"] == first


def test_a_replica_that_dies_before_answering_is_a_503():
    cluster = FakeCluster()

    def send_to_dead(*args):
        async def parts():
            raise ConnectionError("replica a died")
            yield  # an async generator that fails on its first step

        return parts()

    status, _, body = call(build_ingress_app(send_to_dead, cluster.names), "POST", "/v1/chat/completions",
                           {"messages": []})
    assert status == 503 and json.loads(body)["error"]["code"] == "replica_failed"
    cluster.dead = {"a"}  # the router no longer offers it: the other answers
    status, headers, _ = call(build_ingress_app(cluster.send, cluster.names), "POST", "/v1/chat/completions",
                              {"messages": [{"role": "user", "content": "x"}]})
    assert status == 200 and headers["x-vlm-replica"] == "b"


def test_a_stream_whose_replica_dies_ends_with_an_error_event():
    cluster = FakeCluster(fail_mid_stream=True)
    app = build_ingress_app(cluster.send, cluster.names)
    status, _, body = call(app, "POST", "/v1/chat/completions", {"messages": [], "stream": True})
    events = [line for line in body.decode().splitlines() if line.startswith("data: ")]
    assert status == 200 and '"hi"' in events[0]
    assert json.loads(events[-1][6:])["error"]["code"] == "replica_failed"


def test_health_and_metrics_of_every_replica():
    cluster = FakeCluster()
    app = build_ingress_app(cluster.send, cluster.names)
    status, _, body = call(app, "GET", "/health")
    assert status == 200 and json.loads(body)["replicas_healthy"] == 2
    status, _, body = call(app, "GET", "/metrics")
    lines = [line for line in body.decode().splitlines() if line.startswith("vllm:num_requests_waiting{")]
    assert status == 200 and sorted(lines) == ['vllm:num_requests_waiting{model_name="m",replica="a"} 1.0',
                                               'vllm:num_requests_waiting{model_name="m",replica="b"} 1.0']


def test_merged_metrics_parse_back():
    from prometheus_client.parser import text_string_to_metric_families

    page = ("# HELP vllm:prompt_tokens_total p\n# TYPE vllm:prompt_tokens_total counter\n"
            'vllm:prompt_tokens_total{model_name="m"} 5.0\n')
    merged = merge({"a": page, "b": page.replace("5.0", "7.0")})
    families = list(text_string_to_metric_families(merged))
    assert [f.name for f in families] == ["vllm:prompt_tokens"]
    assert sorted((s.labels["replica"], s.value) for s in families[0].samples) == [("a", 5.0), ("b", 7.0)]
