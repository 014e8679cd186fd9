"""The Ray Serve application (runtime/cluster/) end to end on a local Ray instance with 2 replicas of the tiny
model: answers equal to the plain server's, new conversations spread, follow-ups back to their replica (and
not without affinity), /health and /metrics for the whole application, and a killed replica's stream ending
in an error while the other answers. Needs the 'ray' extra; skipped without it."""
from __future__ import annotations

import io
import itertools
import json
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

ray = pytest.importorskip("ray", reason="needs the 'ray' extra: pip install 'vlm-core[ray]'")
serve = pytest.importorskip("ray.serve")
pytest.importorskip("starlette")
openai = pytest.importorskip("openai")
from inprocess_server import InProcessServer, import_httpx, wait_for  # noqa: E402

httpx = import_httpx()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPLICA = "x-vlm-replica"
GREEDY = {"temperature": 0, "max_tokens": 6}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_url(colour: tuple) -> str:
    import base64

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def first_turn(i: int) -> list:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url((30 * i, 200 - 20 * i, 90))}},
                                         {"type": "text", "text": f"Conversation {i}: what is this?"}]}]


def run_or_fail(application, timeout: float = 180, **options) -> None:
    """serve.run, failing after `timeout` seconds instead of waiting forever for replicas Ray cannot place."""
    errors = []

    def run():
        try:
            serve.run(application, **options)
        except Exception as e:  # noqa: BLE001 (raised in the test's thread below)
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if errors:
        raise errors[0]
    if thread.is_alive():
        raise AssertionError(f"the application {options.get('name')!r} was not running after {timeout:g} s: "
                             f"{serve.status()}")


@pytest.fixture(scope="module")
def cluster(qwen_export):
    from vlm_core.runtime.cluster.deployments import build_app

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        common = {"model": qwen_export, "replicas": 2, "threads": 1, "parallel": 4, "num_cpus": 0.5}
        run_or_fail(build_app(common), name="vlm", route_prefix="/")
        run_or_fail(build_app({**common, "affinity": False}), name="vlm-plain", route_prefix="/plain")
        yield {"url": f"http://127.0.0.1:{port}", "plain": f"http://127.0.0.1:{port}/plain"}
    finally:
        serve.shutdown()
        ray.shutdown()


def post(url: str, messages: list, headers: dict | None = None, **fields):
    response = httpx.post(url + "/v1/chat/completions", json={"messages": messages, **GREEDY, **fields},
                          headers=headers or {}, timeout=120)
    assert response.status_code == 200, response.text
    return response.headers[REPLICA], response.json()


def test_answers_equal_the_plain_servers(cluster, qwen_export):
    from vlm_core.runtime.server.app import create_app
    from vlm_core.runtime.server.config import ServeConfig

    messages = first_turn(1)
    client = openai.OpenAI(base_url=cluster["url"] + "/v1", api_key="unused")
    raw = client.chat.completions.with_raw_response.create(model=os.path.basename(qwen_export), messages=messages,
                                                           **GREEDY)
    ours = raw.parse()
    assert raw.headers[REPLICA]
    stream = client.chat.completions.create(messages=messages, model=os.path.basename(qwen_export), stream=True,
                                            **GREEDY)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    with InProcessServer(create_app(ServeConfig(model=qwen_export, threads=1))) as plain:
        reference = openai.OpenAI(base_url=plain.url + "/v1", api_key="unused").chat.completions.create(
            model=os.path.basename(qwen_export), messages=messages, **GREEDY)
    assert ours.choices[0].message.content == reference.choices[0].message.content == streamed
    assert ours.choices[0].finish_reason == reference.choices[0].finish_reason
    assert ours.usage.completion_tokens == reference.usage.completion_tokens
    assert ours.usage.prompt_tokens == reference.usage.prompt_tokens


def conversations(url: str, n: int = 8) -> list:
    """n new conversations at once, then their follow-ups (turns 2 and 3) at once: [(replicas, answers)]."""
    def converse(i: int):
        messages, replicas, answers = first_turn(i), [], []
        for turn in range(3):
            replica, answer = post(url, messages, {"x-session-id": f"{url}-{i}"} if turn == 0 else None)
            replicas.append(replica)
            answers.append(answer)
            messages = messages + [{"role": "assistant", "content": answer["choices"][0]["message"]["content"]},
                                   {"role": "user", "content": f"And then ({turn})?"}]
            barrier.wait(120)  # every conversation finishes this turn before any starts the next
        return replicas, answers

    barrier = threading.Barrier(n)
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(converse, range(n)))


def test_conversations_spread_and_follow_ups_return_to_their_replica(cluster):
    results = conversations(cluster["url"])
    first = [replicas[0] for replicas, _ in results]
    assert len(set(first)) == 2 and min(first.count(r) for r in set(first)) >= 2, first
    for replicas, answers in results:
        assert replicas[1] == replicas[2] == replicas[0]  # by prefix (the session header was on turn 1 only)
        for earlier, later in itertools.pairwise(answers):
            # the whole earlier prompt came from the prefix cache, not just the chat template's first tokens
            assert later["usage"]["prompt_tokens_details"]["cached_tokens"] >= earlier["usage"]["prompt_tokens"]


def test_without_affinity_follow_ups_land_anywhere(cluster):
    results = conversations(cluster["plain"])
    moved = sum(later != replicas[0] for replicas, _ in results for later in replicas[1:])
    missed = sum(later["usage"]["prompt_tokens_details"]["cached_tokens"] < earlier["usage"]["prompt_tokens"]
                 for _, answers in results for earlier, later in itertools.pairwise(answers))
    # 16 follow-ups placed by load alone over 2 replicas: all 16 back home by chance is a 2**-16 event
    assert moved >= 1 and missed >= 1, (moved, missed)


def test_health_and_metrics_cover_every_replica(cluster):
    health = httpx.get(cluster["url"] + "/health", timeout=60)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["replicas_healthy"] == 2
    page = httpx.get(cluster["url"] + "/metrics", timeout=60)
    assert page.status_code == 200
    waiting = [line for line in page.text.splitlines() if line.startswith("vllm:num_requests_waiting{")]
    assert len(waiting) == 2 and all('replica="' in line for line in waiting)
    assert "vllm:prompt_tokens_total{" in page.text


def test_a_killed_replica_ends_its_stream_with_an_error_and_the_other_answers(cluster):
    body = {"messages": [{"role": "user", "content": "Count for a long time."}], "stream": True,
            "temperature": 0, "max_tokens": 3000, "min_tokens": 3000}
    events = []
    with httpx.stream("POST", cluster["url"] + "/v1/chat/completions", json=body, timeout=120) as response:
        victim = response.headers[REPLICA]
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: ") and '"content"' in line:
                break  # it is generating
        ray.kill(ray.get_actor(f"SERVE_REPLICA::vlm#VLMModel#{victim}", namespace="serve"), no_restart=False)
        events = [line for line in lines if line.startswith("data: ")]  # ends: no hang
    assert events and "error" in json.loads(events[-1][len("data: "):])
    replica, answer = post(cluster["url"], [{"role": "user", "content": "Still there?"}])
    assert replica != victim and answer["choices"][0]["message"]["content"] is not None
    # Ray restarts the killed replica: the application is whole again
    wait_for(lambda: httpx.get(cluster["url"] + "/health", timeout=60).json().get("replicas_healthy") == 2,
             timeout=120, what="the killed replica to be replaced")
