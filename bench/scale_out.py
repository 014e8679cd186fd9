"""Scale-out on Ray Serve (runtime/cluster/), measured on one host where 2 replicas cannot show scaling:

    python -m bench.scale_out --export bench-out/int4 [--out docs/bench-scale-out-2b-int4.json]

  * what routing costs per request: `routing_key` over a conversation with a photo (the ingress's part) and
    `choose` against a table of many remembered conversations (the router's part), in microseconds; and
    the Ray router's own total decision time over the run, per request;
  * the follow-up's time to first token with affinity on and off: --conversations conversations, each a
    photo and a question then a follow-up, over 2 replicas of --threads threads each; with affinity off the
    follow-ups are placed by load, and those that land on the other replica pay the whole first turn again;
  * the time a request spends outside the engine (ingress, Ray's handle call, the replica's HTTP layer);
  * the memory (RSS) of each model replica after the run.
Starts a local Ray instance (`ray.init(num_cpus=2)`), so it needs the 'ray' extra. Prints and writes JSON.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from . import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def photo_url(seed: int, size=(640, 480)) -> str:
    """A photograph-like noise JPEG (distinct per seed) as a data: URL."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = (rng.random((size[1] // 8, size[0] // 8, 3)) * 255).astype("uint8")
    image = Image.fromarray(pixels).resize(size, Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def first_turn(seed: int) -> list:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": photo_url(seed)}},
                                         {"type": "text", "text": f"Describe photo {seed} in one sentence."}]}]


def routing_cost(repeats: int = 2000) -> dict:
    """Microseconds per request for the ingress's routing_key and the router's choose (pure Python)."""
    from vlm_core.runtime.cluster.affinity import AffinityTable, choose, routing_key

    table, rng = AffinityTable(), random.Random(0)
    replicas = [f"r{i}" for i in range(8)]
    for i in range(1000):  # a thousand conversations remembered
        table.record(routing_key({"messages": [{"role": "user", "content": f"conversation {i} " * 20}]},
                                 {"x-session-id": str(i)}), rng.choice(replicas))
    messages = first_turn(1) + [{"role": "assistant", "content": "A photo of noise. " * 10},
                                {"role": "user", "content": "What colours are in it?"}]
    body = {"messages": messages}
    start = time.perf_counter()
    for _ in range(200):
        key = routing_key(body)
    key_us = (time.perf_counter() - start) / 200 * 1e6
    text_body = {"messages": [m for m in messages if isinstance(m["content"], str)]}
    start = time.perf_counter()
    for _ in range(repeats):
        routing_key(text_body)
    text_key_us = (time.perf_counter() - start) / repeats * 1e6
    loads = {r: rng.randrange(4) for r in replicas}
    start = time.perf_counter()
    for _ in range(repeats):
        choose(key, loads, table, rng=rng)
    choose_us = (time.perf_counter() - start) / repeats * 1e6
    image_kb = len(messages[0]["content"][0]["image_url"]["url"]) / 1024
    return {"routing_key_us_with_photo": round(key_us, 1), "photo_data_url_kb": round(image_kb, 1),
            "routing_key_us_text_only": round(text_key_us, 1), "choose_us_8_replicas_1000_conversations":
            round(choose_us, 1)}


def ttft(url: str, messages: list, max_tokens: int) -> tuple[float, str, dict]:
    """(seconds to the first content event, replica, final usage) of one streamed request."""
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    body = {"messages": messages, "stream": True, "temperature": 0, "max_tokens": max_tokens,
            "stream_options": {"include_usage": True}}
    start, first, text, usage = time.perf_counter(), None, [], {}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        replica = response.headers["x-vlm-replica"]
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices", []):
                if choice["delta"].get("content"):
                    first = first or time.perf_counter() - start
                    text.append(choice["delta"]["content"])
            usage = event.get("usage") or usage
    return first, replica, {"text": "".join(text), **usage}


def conversation_round(url: str, n: int, max_tokens: int, seed0: int) -> list:
    """n conversations, first turns concurrently then follow-ups concurrently: per conversation
    (first ttft, first replica, follow-up ttft, follow-up replica, cached tokens)."""
    def first(i):
        return ttft(url, first_turn(seed0 + i), max_tokens)

    with ThreadPoolExecutor(n) as pool:
        firsts = list(pool.map(first, range(n)))

    def follow(i):
        answer = firsts[i][2]["text"]
        messages = first_turn(seed0 + i) + [{"role": "assistant", "content": answer},
                                            {"role": "user", "content": "And what would you call it?"}]
        return ttft(url, messages, max_tokens)

    with ThreadPoolExecutor(n) as pool:
        follows = list(pool.map(follow, range(n)))
    return [{"first_ttft_s": round(f[0], 3), "first_replica": f[1], "follow_ttft_s": round(g[0], 3),
             "follow_replica": g[1], "follow_cached_tokens": g[2].get("prompt_tokens_details", {}).get(
                 "cached_tokens", 0), "follow_prompt_tokens": g[2].get("prompt_tokens")}
            for f, g in zip(firsts, follows)]


def overhead(url: str, repeats: int = 20) -> dict:
    """Time outside the engine per request through Ray: a 1-token text request's latency at the client minus
    the engine's own time to its first token (the answer's timings), medians over `repeats` sequential calls."""
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    outside, total = [], []
    for i in range(repeats):
        body = {"messages": [{"role": "user", "content": f"Say {i}."}], "max_tokens": 1, "temperature": 0}
        start = time.perf_counter()
        answer = httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()
        elapsed = time.perf_counter() - start
        total.append(elapsed)
        outside.append(elapsed - answer["timings"]["ttft_s"])
    return {"latency_median_ms": round(statistics.median(total) * 1e3, 1),
            "outside_engine_median_ms": round(statistics.median(outside) * 1e3, 1)}


def replica_rss_mb() -> list:
    """RSS (MiB) of the model replicas' processes on this host."""
    pids = subprocess.run(["pgrep", "-f", "ServeReplica:.*:VLMModel"], check=False, capture_output=True,
                          text=True).stdout.split()
    sizes = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                sizes += [int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:")]
        except OSError:
            pass
    return [round(s) for s in sorted(sizes)]


def summarize(rows: list) -> dict:
    home = [r["follow_ttft_s"] for r in rows if r["follow_replica"] == r["first_replica"]]
    away = [r["follow_ttft_s"] for r in rows if r["follow_replica"] != r["first_replica"]]
    return {"first_ttft_median_s": round(statistics.median(r["first_ttft_s"] for r in rows), 3),
            "follow_ttft_median_s": round(statistics.median(r["follow_ttft_s"] for r in rows), 3),
            "follow_home": len(home), "follow_away": len(away),
            "follow_ttft_home_median_s": round(statistics.median(home), 3) if home else None,
            "follow_ttft_away_median_s": round(statistics.median(away), 3) if away else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--export", required=True, help="exported model folder")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per replica (default 1)")
    p.add_argument("--conversations", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args(argv)
    import ray
    from ray import serve

    from vlm_core.runtime.cluster.deployments import build_app

    result = {"machine": machine.describe(), "export": os.path.abspath(args.export), "threads": args.threads,
              "routing": routing_cost()}
    print(json.dumps(result["routing"]), flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for affinity in (True, False):
            started = time.perf_counter()
            serve.run(build_app({"model": args.export, "replicas": 2, "threads": args.threads, "parallel": 4,
                                 "num_cpus": 1, "affinity": affinity}), name="vlm", route_prefix="/")
            ready_s = time.perf_counter() - started
            rows = conversation_round(url, args.conversations, args.max_tokens, seed0=100 if affinity else 200)
            costs = overhead(url)
            ingress = serve.get_deployment_handle("VLMIngress", app_name="vlm")
            routers = ingress.routers.remote().result()
            name = "affinity_on" if affinity else "affinity_off"
            result[name] = {"ready_s": round(ready_s, 1), **summarize(rows), "request_overhead": costs,
                            "rows": rows, "routers": routers,
                            "replica_rss_mb": replica_rss_mb()}
            print(name, json.dumps({k: v for k, v in result[name].items() if k != "rows"}), flush=True)
            serve.delete("vlm")
    finally:
        serve.shutdown()
        ray.shutdown()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
