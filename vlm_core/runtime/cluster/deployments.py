"""The Ray Serve application: an ingress deployment with the server's routes, and a model deployment whose
replicas each own one engine over one export folder (the shape `ray.serve.llm` uses), routed by
router.py's AffinityRequestRouter.

    serve run vlm_core.runtime.cluster.deployments:build_app model=/models/qwen3-vl-2b-int4 replicas=2
    serve deploy examples/ray-serve.yaml          # the same builder, from a config file
    vlm-serve -m /models/qwen3-vl-2b-int4 --ray --replicas 2

`build_app(args)` takes the builder arguments as strings or values: ``model`` (required), ``replicas``
(default 1), ``min_replicas`` / ``max_replicas`` (autoscaling on requests in flight per replica, Ray's
``target_ongoing_requests``: the engine's ``parallel``), ``affinity`` (default true), ``margin``
(the imbalance bound, affinity.py), ``num_cpus`` per replica (default: ``threads``, else 1), ``ingress_cpus``
(default 0), and any
ServeConfig field (threads, parallel, cache_mb, max_queue, api_key, ...). Ray restarts a replica whose actor
dies or whose health check fails (`check_health` asks the replica's engine to answer /health).
"""
from __future__ import annotations

import dataclasses

from ray import serve
from ray.serve.config import RequestRouterConfig

from vlm_core.runtime.cluster.affinity import DEFAULT_MARGIN
from vlm_core.runtime.server.config import ServeConfig

MODEL_DEPLOYMENT = "VLMModel"
INGRESS_DEPLOYMENT = "VLMIngress"
ROUTER_CLASS = "vlm_core.runtime.cluster.router:AffinityRequestRouter"


@serve.deployment(name=MODEL_DEPLOYMENT, health_check_period_s=10, health_check_timeout_s=30)
class VLMModel:
    """One replica: the plain server's app (replica.py) over its own engine."""

    def __init__(self, config: dict):
        from vlm_core.runtime.cluster.replica import ModelReplica

        replica_id = serve.get_replica_context().replica_id.unique_id
        self.replica = ModelReplica(ServeConfig(**config), replica_id)

    async def handle(self, method: str, target: str, headers: list, body: bytes = b"", routing=None):
        """Answer one forwarded request (streamed). `routing` is read by the router, not here."""
        async for part in self.replica.handle(method, target, headers, body):
            yield part

    async def check_health(self) -> None:
        """Ray's health check: raise (and be restarted) when the app cannot answer /health."""
        from vlm_core.runtime.server.asgi_call import request

        status, _, body = await request(self.replica.app, "GET", "/health")
        if status != 200:
            raise RuntimeError(f"/health answered {status}: {body[:200]!r}")

    def __del__(self):
        replica = getattr(self, "replica", None)
        if replica is not None:
            replica.close()


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress()
class VLMIngress:
    """The HTTP routes (ingress.py) over a handle to the model deployment."""

    def __init__(self, model):
        self.model = model.options(stream=True)

    def __serve_build_asgi_app__(self):
        from vlm_core.runtime.cluster.ingress import build_ingress_app

        return build_ingress_app(self.send, self.replicas)

    def send(self, method: str, target: str, headers: list, body: bytes, routing: dict):
        """The replica's response parts, as an async iterator; closing it cancels the request on the replica."""
        response = self.model.handle.remote(method, target, headers, body, routing=routing)

        async def parts():
            finished = False
            try:
                async for part in response:
                    yield part
                finished = True
            finally:
                if not finished:
                    response.cancel()

        return parts()

    def routers(self) -> list:
        """The request routers of this process (diagnostics, benchmarks): deployment, replicas, decisions by
        reason, and the mean time `choose` took per decision in microseconds."""
        from vlm_core.runtime.cluster.router import ROUTERS

        return [{"deployment": r.deployment_name, "replicas": r.replica_ids(), "decisions": dict(r.decisions),
                 "choose_us": round(r.decision_seconds / max(sum(r.decisions.values()), 1) * 1e6, 1)}
                for r in list(ROUTERS)]

    async def replicas(self) -> list:
        """The model replicas the router knows; the first call sends one request so that a router exists."""
        from vlm_core.runtime.cluster.router import ROUTERS

        def known():
            ids = set()
            for router in list(ROUTERS):
                if router.deployment_name == MODEL_DEPLOYMENT:
                    ids.update(router.replica_ids())
            return sorted(ids)

        if not known():
            async for _ in self.send("GET", "/v1/models", [], b"", {}):
                pass
        return known()


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")


def build_app(args: dict):
    """The application for `serve run` / `serve deploy` (see the module docstring for `args`)."""
    args = dict(args)
    fields = {f.name: f for f in dataclasses.fields(ServeConfig)}
    if "model" not in args:
        raise ValueError("build_app needs model=EXPORT_FOLDER")
    config = {}
    for name, value in list(args.items()):
        if name in fields:
            config[name] = _coerce(value, fields[name].default)
            del args[name]
    replicas = int(args.pop("replicas", 1))
    min_replicas, max_replicas = args.pop("min_replicas", None), args.pop("max_replicas", None)
    affinity = _flag(args.pop("affinity", True))
    margin = int(args.pop("margin", DEFAULT_MARGIN))
    num_cpus = float(args.pop("num_cpus", config.get("threads") or 1))
    ingress_cpus = float(args.pop("ingress_cpus", 0))  # it parses JSON and forwards bytes: no core of its own
    if args:
        raise ValueError(f"unknown build_app arguments: {', '.join(sorted(args))}")
    serve_config = ServeConfig(**config)
    options = {
        "ray_actor_options": {"num_cpus": num_cpus},
        # what a replica takes at once: its batch and its queue; Ray sends more elsewhere (or queues them)
        "max_ongoing_requests": serve_config.parallel + serve_config.max_queue,
        "request_router_config": RequestRouterConfig(request_router_class=ROUTER_CLASS,
                                                     request_router_kwargs={"margin": margin, "affinity": affinity}),
    }
    if min_replicas is not None or max_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": int(min_replicas or 1),
                                         "max_replicas": int(max_replicas or replicas),
                                         "initial_replicas": replicas,
                                         "target_ongoing_requests": serve_config.parallel}
    else:
        options["num_replicas"] = replicas
    model = VLMModel.options(**options).bind(dataclasses.asdict(serve_config))
    return VLMIngress.options(ray_actor_options={"num_cpus": ingress_cpus}).bind(model)


def _coerce(value, default):
    """A builder argument (a string from the command line) as the type of its ServeConfig default."""
    if default is dataclasses.MISSING:  # the model folder
        return value
    if not isinstance(value, str) or isinstance(default, str) or default is None:
        if isinstance(value, str) and default is None and value.lower() in ("none", "null", ""):
            return None
        if isinstance(value, str) and default is None and value.lstrip("-").isdigit():
            return int(value)
        return value
    if isinstance(default, bool):
        return _flag(value)
    return type(default)(value)
