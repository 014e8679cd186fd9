"""`GET /metrics` (runtime/server/metrics.py): vLLM's names with the right values.

After a known set of requests the token counters equal the sum of the responses' `usage`; while streams
run and others queue, the running / waiting gauges equal what the engine and the scheduler hold. The app
runs in this process (tests/inprocess_server.py) on the tiny exported model, so the test can read the truth."""
from __future__ import annotations

import base64
import os
import threading

import pytest

pytest.importorskip("starlette", reason="the server needs the 'serve' extra (starlette, uvicorn)")
pytest.importorskip("uvicorn", reason="the server needs the 'serve' extra (starlette, uvicorn)")
pytest.importorskip("prometheus_client", reason="/metrics needs the 'metrics' extra (prometheus_client)")
from inprocess_server import InProcessServer, import_httpx, wait_for  # noqa: E402

httpx = import_httpx()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(ROOT, "assets", "astronaut.jpg")
LONG = {"max_tokens": 3000, "min_tokens": 3000}  # holds a worker for seconds on the tiny model


def image_url() -> str:
    with open(IMAGE, "rb") as f:
        return "data:image/jpeg;base64," + base64.b64encode(f.read()).decode()


@pytest.fixture(scope="module")
def served(qwen_export):
    from vlm_core.runtime.server.app import create_app
    from vlm_core.runtime.server.config import ServeConfig

    app = create_app(ServeConfig(model=qwen_export, threads=1, parallel=2, max_queue=4))
    with InProcessServer(app) as server:
        yield server


def scrape(server) -> dict:
    """{(name, frozenset(labels without model_name)): value} of one /metrics scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(server.url + "/metrics", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    values = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k != "model_name"}
            values[(sample.name, frozenset(labels.items()))] = sample.value
    return values


def value(scraped: dict, name: str, **labels) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


def chat(server, messages, **fields) -> dict:
    response = httpx.post(server.url + "/v1/chat/completions", timeout=120,
                          json={"messages": messages, "temperature": 0, **fields})
    return {"status": response.status_code, **response.json()}


def test_token_counters_equal_the_sum_of_usage(served):
    before = scrape(served)
    text = [{"role": "user", "content": "Describe a cat."}]
    photo = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url()}},
                                          {"type": "text", "text": "Describe."}]}]
    answers = [chat(served, text, max_tokens=6), chat(served, photo, max_tokens=5),
               chat(served, photo, max_tokens=4)]  # the same image again: its prompt's KV is cached
    follow_up = photo + [{"role": "assistant", "content": answers[1]["choices"][0]["message"]["content"]},
                         {"role": "user", "content": "And then?"}]
    answers.append(chat(served, follow_up, max_tokens=3))
    # a new text before the same image: no prefix reaches the image, its features come from the image cache
    answers.append(chat(served, [{"role": "system", "content": "Be brief."}] + photo, max_tokens=3))
    bad = chat(served, "not a list")
    assert [a["status"] for a in answers] == [200] * 5 and bad["status"] == 400
    usage = [a["usage"] for a in answers]
    assert usage[3]["prompt_tokens_details"]["cached_tokens"] > 0
    after = scrape(served)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("vllm:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usage)
    assert delta("vllm:generation_tokens_total") == sum(u["completion_tokens"] for u in usage)
    assert delta("vllm:prefix_cache_queries_total") == sum(u["prompt_tokens"] for u in usage)
    assert delta("vllm:prefix_cache_hits_total") == sum(u["prompt_tokens_details"]["cached_tokens"] for u in usage)
    reasons = [a["choices"][0]["finish_reason"] for a in answers]
    for reason in set(reasons):
        assert delta("vllm:request_success_total", finished_reason=reason) == reasons.count(reason)
    assert delta("vllm:time_to_first_token_seconds_count") == 5
    assert delta("vllm:time_per_output_token_seconds_count") == 5  # every answer has tokens after its first
    assert delta("vlm_core:images_encoded_total") == 1  # encoded once, then its KV or its features were cached
    assert delta("vlm_core:image_cache_hits_total") == 1
    assert 1 <= delta("vlm_core:image_encode_seconds_count") <= 2  # the encode, and maybe the (~0 s) cache hit
    assert delta("vlm_core:http_responses_total", code="200") == 5 + 1  # and the first scrape
    assert delta("vlm_core:http_responses_total", code="400") == 1
    assert delta("vlm_core:requests_total", outcome="completed") == 5
    assert value(after, "vllm:num_requests_running") == 0 and value(after, "vllm:num_requests_waiting") == 0
    assert value(after, "vllm:kv_cache_usage_perc") == 0


def test_gauges_while_streams_run_and_queue(served):
    """parallel=2: two long streams decode, two more wait in the queue; the gauges say so, and the KV use is
    the engine's filled slots over parallel x max_context."""
    app = served.app

    def scrape_when(condition):
        scraped = scrape(served)
        return scraped if condition(scraped) else None

    vlm, scheduler = app.state.vlm, app.state.scheduler
    stop = threading.Event()
    opened = []

    def stream(i: int):
        body = {"messages": [{"role": "user", "content": f"Count to {i}."}], "stream": True, "temperature": 0,
                **LONG}
        with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=120) as response:
            opened.append(response.status_code)
            for _ in response.iter_bytes():
                if stop.is_set():
                    return  # leaving the block closes the connection: the server cancels the request

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(4)]
    try:
        for thread in threads:
            thread.start()
        # wait on the truth (the engine's and the scheduler's own counts), which then holds while the long streams
        # decode; the scrape taken after it must say the same (reading both at once can race an admission)
        wait_for(lambda: (lambda stats: stats["decoding"] + stats["prefilling"] == 2 and scheduler.queued == 2)(
            vlm.engine.stats()) or None, what="2 running and 2 waiting")
        scraped = scrape(served)
        assert value(scraped, "vllm:num_requests_running") == 2 and value(scraped, "vllm:num_requests_waiting") == 2
        usage = value(scraped, "vllm:kv_cache_usage_perc")
        capacity = vlm.engine.parallel * vlm.max_context
        assert 0 < usage < 1
        # each running stream holds at least its prompt, and at most prompt + 3000 tokens
        assert 2 * 9 <= usage * capacity <= 2 * (40 + LONG["max_tokens"])
        later = wait_for(lambda: scrape_when(lambda s: value(s, "vllm:kv_cache_usage_perc") > usage),
                         what="the KV use to grow as the streams decode")
        assert value(later, "vllm:num_requests_running") == 2
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    wait_for(lambda: scrape_when(lambda s: value(s, "vllm:num_requests_running") == 0
                                 and value(s, "vllm:num_requests_waiting") == 0), what="the server to be idle")
    assert value(scrape(served), "vllm:kv_cache_usage_perc") == 0
