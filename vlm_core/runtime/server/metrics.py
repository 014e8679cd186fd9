"""`GET /metrics`: the server's state and its requests' statistics in Prometheus' text format.

Needs the optional ``metrics`` extra (prometheus_client); without it `/metrics` answers 404 naming the install
line, and nothing else changes. Names follow vLLM's wherever vLLM measures the same thing, so its Grafana
dashboards and the Kubernetes Gateway API Inference Extension (which routes on the first three below; its
model-server protocol, proposal 003) work unchanged; what is ours alone is under ``vlm_core:``. Every series
carries vLLM's ``model_name`` label.

Read at scrape time from the owners of the numbers (nothing is timed or counted twice):

* ``vllm:num_requests_running``: sequences in the engine reading their prompt or decoding;
* ``vllm:num_requests_waiting``: requests in the server's queue plus sequences submitted to the engine and not
  yet admitted. A request a worker is preparing (image decode, chat template) is in neither, as vLLM's front
  end does not count the requests it is tokenizing;
* ``vllm:kv_cache_usage_perc``: KV slots filled over the most the engine can hold, ``parallel x max_context``
  (vLLM's "1 means 100 percent"), from the decode batch's row lengths and the prompts being prefilled;
* ``vlm_core:requests_total{outcome}``: the scheduler's own counts (started, completed, failed, cancelled,
  rejected, timeouts); ``vlm_core:images_encoded_total`` and ``vlm_core:image_cache_hits_total``: the engine's.

Observed once per request when its generation ends, from the events the engine produced (`watch`): the
token counters (``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``, ``vllm:prefix_cache_queries_total``
and ``vllm:prefix_cache_hits_total``, in tokens, as vLLM counts them), ``vllm:request_success_total
{finished_reason}``, and the histograms of the engine's timings: ``vllm:time_to_first_token_seconds``,
``vllm:time_per_output_token_seconds`` (the request's mean over its tokens after the first) and
``vlm_core:image_encode_seconds`` (the engine's vision-step seconds of a request: the graph's run for images it
had to encode, about zero for images whose features came from the cache; not observed when none were read).
``vlm_core:http_responses_total{code}`` counts every answer by HTTP status (4xx and 5xx included).

    metrics.install(app, server)      # in create_app: the route, the status counter, server.metrics
"""
from __future__ import annotations

import logging

log = logging.getLogger("vlm_core.runtime.server")

INSTALL_HINT = "pip install 'vlm-core[metrics]'"
# vLLM's buckets (vllm/v1/metrics/loggers.py), so its dashboards' panels line up.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
IMAGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


def available() -> bool:
    """Whether prometheus_client (the 'metrics' extra) is installed."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


class ServerMetrics:
    """The registry of one server (its own, not prometheus_client's global one: several apps may share a
    process, as the tests' and a Ray node's do).

    Args:
        vlm: the loaded VisionLanguageModel (its `engine` is read at scrape time).
        scheduler: the server's Scheduler (its counts are read at scrape time).
        model_name: the model id clients use (the ``model_name`` label).
    """

    def __init__(self, vlm, scheduler, model_name: str):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.vlm, self.scheduler, self.model_name = vlm, scheduler, model_name
        self.registry = registry = CollectorRegistry(auto_describe=True)
        labels, name = ["model_name"], {"model_name": model_name}

        def counter(metric: str, documentation: str):
            return Counter(metric, documentation, labels, registry=registry).labels(**name)

        def histogram(metric: str, documentation: str, buckets):
            return Histogram(metric, documentation, labels, buckets=buckets, registry=registry).labels(**name)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.prefix_queries = counter("vllm:prefix_cache_queries",
                                      "Prefix cache queries, in prompt tokens looked up.")
        self.prefix_hits = counter("vllm:prefix_cache_hits",
                                   "Prefix cache hits, in prompt tokens whose KV came from the cache.")
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.",
                               ["model_name", "finished_reason"], registry=registry)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS)
        self.tpot = histogram("vllm:time_per_output_token_seconds",
                              "Histogram of time per output token in seconds (a request's mean after its first).",
                              TPOT_BUCKETS)
        self.image_encode = histogram("vlm_core:image_encode_seconds",
                                      "Seconds a request spent in the vision step (encoding its images).",
                                      IMAGE_BUCKETS)
        self.http = Counter("vlm_core:http_responses", "HTTP responses by status code.", ["model_name", "code"],
                            registry=registry)
        registry.register(_StateCollector(self))

    # --- per request ------------------------------------------------------------------------------
    def watch(self, events):
        """Pass a job's events (`worker.run`) through unchanged, recording the request when they end.

        A request that ends early (cancelled, failed, timed out) still counts the tokens it was given and
        generated; only a Finished event counts as a success and feeds the histograms."""
        from vlm_core.runtime.server.worker import Finished, Prepared

        prompt_tokens, generated, finished = 0, 0, None
        try:
            for event in events:
                if isinstance(event, Prepared):
                    prompt_tokens = event.prompt_tokens
                elif isinstance(event, Finished):
                    finished = event
                elif getattr(event, "token_id", None) is not None:
                    generated += 1
                yield event
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
            try:
                self.record(prompt_tokens, generated, finished)
            except Exception:  # statistics never fail a request
                log.exception("recording a request's metrics failed")

    def record(self, prompt_tokens: int, generated: int, finished) -> None:
        """Count one request: its prompt and generated tokens, and, when it finished, its reason and timings."""
        if finished is not None:
            generated = finished.completion_tokens
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated)
        if finished is None:
            return
        self.prefix_queries.inc(prompt_tokens)
        self.prefix_hits.inc(finished.cached_tokens)
        self.success.labels(model_name=self.model_name, finished_reason=finished.finish_reason).inc()
        timings = finished.timings
        if timings.get("ttft_s", 0) > 0:
            self.ttft.observe(timings["ttft_s"])
        if timings.get("decode_tokens_per_s", 0) > 0:
            self.tpot.observe(1.0 / timings["decode_tokens_per_s"])
        if timings.get("vision_s", 0) > 0:
            self.image_encode.observe(timings["vision_s"])

    def count_response(self, status: int) -> None:
        self.http.labels(model_name=self.model_name, code=str(status)).inc()

    def exposition(self) -> tuple[bytes, str]:
        """(the text format's bytes, its content type)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def engine_state(vlm, scheduler) -> dict:
    """running, waiting and kv_cache_usage (0..1) now, from the engine's `stats()` and the scheduler's queue.

    The filled KV slots are the batch's row lengths (decoding sequences and those still reading their prompt
    alike); read from the event loop while the engine thread runs, so the list is copied before summing."""
    engine = vlm.engine
    stats = engine.stats()
    filled = sum(list(engine.batch.lengths))
    capacity = engine.parallel * vlm.max_context
    return {"running": stats["prefilling"] + stats["decoding"], "waiting": scheduler.queued + stats["waiting"],
            "kv_cache_usage": min(1.0, filled / capacity) if capacity else 0.0}


class _StateCollector:
    """The gauges and the counters their owners keep, read at scrape time."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def describe(self):
        return []  # no fixed description: collect() runs at each scrape only

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        metrics = self.metrics
        labels, name = ["model_name"], [metrics.model_name]
        state = engine_state(metrics.vlm, metrics.scheduler)
        for metric, documentation, value in (
                ("vllm:num_requests_running", "Number of requests in model execution batches.", state["running"]),
                ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", state["waiting"]),
                ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", state["kv_cache_usage"])):
            gauge = GaugeMetricFamily(metric, documentation, labels=labels)
            gauge.add_metric(name, value)
            yield gauge
        outcomes = CounterMetricFamily("vlm_core:requests", "Requests by what became of them in the scheduler.",
                                       labels=["model_name", "outcome"])
        for outcome, count in sorted(metrics.scheduler.stats.items()):
            outcomes.add_metric([metrics.model_name, outcome], count)
        yield outcomes
        engine = metrics.vlm.engine
        images = CounterMetricFamily("vlm_core:images_encoded", "Images and clips run through the vision graph.",
                                     labels=labels)
        images.add_metric(name, engine.counters.get("vision_images", 0))
        yield images
        hits = CounterMetricFamily("vlm_core:image_cache_hits", "Images whose features came from the cache.",
                                   labels=labels)
        hits.add_metric(name, engine.cache.hits["image"] if engine.cache is not None else 0)
        yield hits


class StatusCounter:
    """ASGI middleware counting every HTTP response by status (an error raised past the handlers counts 500)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def counting_send(message):
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                self.metrics.count_response(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not started:
                self.metrics.count_response(500)
            raise


def install(app, server) -> ServerMetrics | None:
    """Add `/metrics` and the status counter to a server's Starlette `app` (before it starts) and set
    `server.metrics`; without prometheus_client, `/metrics` answers 404 naming the extra and None is returned."""
    from starlette.responses import Response

    from vlm_core.errors import NotFound

    metrics = ServerMetrics(server.vlm, server.scheduler, server.model_name) if available() else None
    server.metrics = metrics

    async def endpoint(request):
        if metrics is None:
            raise NotFound(f"/metrics needs the 'metrics' extra (prometheus_client): {INSTALL_HINT}")
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    app.add_route("/metrics", endpoint, methods=["GET"])
    if metrics is not None:
        app.add_middleware(StatusCounter, metrics=metrics)
    return metrics
