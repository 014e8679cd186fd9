"""Serving many streams: the server's batched engine measured through HTTP on an exported model.

    python -m bench.serving --export bench-out/int4 [--out docs/bench-serving.json]

Starts `python -m vlm_core.runtime.server` on the export and measures, each client sending its own image
(generated photographs-like noise of a fixed size, distinct per client):
  * aggregate decode tokens/s with 1, 2, 4 and 8 concurrent streams (tokens produced while every
    stream is decoding, over that window; medians of --repeats rounds, each round running every level once,
    with the spread and each round's ratio to its one-stream run);
  * the longest gap between two tokens of a running stream while another request's image and prompt
    are prefilled, next to the time of one prefill chunk and one decode step;
  * time to first token of a follow-up question about the same image vs the first question;
  * peak RSS of the server with 4 streams of --long-tokens tokens each vs one such stream
    (separate server processes: peak RSS only grows).
Prints a table and writes JSON. Torch is not needed.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time

from . import machine
from .report import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Server:
    """`python -m vlm_core.runtime.server` on a free port, stopped on exit."""

    def __init__(self, model: str, *args: str):
        cmd = [sys.executable, "-m", "vlm_core.runtime.server", "-m", model, "--port", "0", "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline, lines = time.monotonic() + 300, []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            match = re.search(r"on http://127\.0\.0\.1:(\d+)/", line)
            if match:
                self.port = int(match.group(1))
                break
        if not getattr(self, "port", None):
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(lines))
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)

    def peak_rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def health(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())

    def stream(self, messages: list, max_tokens: int, stamps: list, cancel: threading.Event | None = None) -> dict:
        """Stream one greedy answer of exactly max_tokens tokens; appends each delta's arrival time to `stamps`."""
        body = {"messages": messages, "stream": True, "temperature": 0, "max_tokens": max_tokens,
                "min_tokens": max_tokens, "stream_options": {"include_usage": True}}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        start = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
        usage, pieces = None, []
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
                pieces.append(event["choices"][0]["delta"]["content"])  # text arrived (the first event, the role, has none)
            if event.get("usage"):
                usage = event["usage"]
            if cancel is not None and cancel.is_set():
                break
        conn.close()
        return {"start": start, "usage": usage, "text": "".join(pieces)}


def image_url(seed: int, size: int) -> str:
    """A distinct smooth-noise PNG per client (a real image path would do the same)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = (rng.random((8, 8, 3)) * 255).astype("uint8")
    image = Image.fromarray(small).resize((size, size), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def user(seed: int, size: int, text: str) -> list:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(seed, size)}},
                                         {"type": "text", "text": text}]}]


def concurrent(server: Server, streams: int, tokens: int, size: int, seed: int) -> dict:
    """N streams at once; aggregate tokens/s over the window in which all of them decode."""
    stamps = [[] for _ in range(streams)]
    threads = [threading.Thread(target=server.stream, args=(user(seed + i, size, f"Describe picture {i}."), tokens,
                                                            stamps[i])) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    begin = max(s[0] for s in stamps)  # every stream has its first token
    end = min(s[-1] for s in stamps)  # no stream has finished
    produced = sum(sum(1 for t in s if begin < t <= end) for s in stamps)
    return {"streams": streams, "window_s": round(end - begin, 2), "tokens_in_window": produced,
            "tokens_per_s": round(produced / (end - begin), 2) if end > begin else None}


def gap_during_prefill(server: Server, size: int, chunk: int) -> dict:
    """A running stream's longest inter-token gap while another request's image + prompt are prefilled."""
    stamps, other = [], []
    runner = threading.Thread(target=server.stream, args=(user(100, size, "Describe it."), 400, stamps))
    runner.start()
    while len(stamps) < 20:
        time.sleep(0.01)
    steady = [b - a for a, b in zip(stamps[5:19], stamps[6:20])]
    arrived = time.perf_counter()
    newcomer = server.stream(user(101, size, "What is in this picture? " * 8), 2, other)
    first_token = other[0]
    runner.join()
    during = [b - a for a, b in zip(stamps, stamps[1:]) if b > arrived and a < first_token]
    return {"newcomer_ttft_s": round(first_token - newcomer["start"], 3),
            "newcomer_prompt_tokens": newcomer["usage"]["prompt_tokens"] if newcomer["usage"] else None,
            "steady_step_s": round(statistics.median(steady), 4), "longest_gap_s": round(max(during), 3),
            "prefill_chunk": chunk}


def follow_up(server: Server, size: int) -> dict:
    """TTFT of a first question about an image, then of a follow-up about the same image."""
    stamps1, stamps2 = [], []
    messages = user(200, size, "What is in this picture?")
    first = server.stream(messages, 16, stamps1)
    history = messages + [{"role": "assistant", "content": first["text"]},  # what a chat client sends back
                          {"role": "user", "content": "What colours does it have?"}]
    second = server.stream(history, 16, stamps2)
    t1, t2 = stamps1[0] - first["start"], stamps2[0] - second["start"]
    return {"first_ttft_s": round(t1, 3), "follow_up_ttft_s": round(t2, 3), "ratio": round(t2 / t1, 3),
            "follow_up_cached_tokens": second["usage"]["prompt_tokens_details"]["cached_tokens"],
            "follow_up_prompt_tokens": second["usage"]["prompt_tokens"]}


def peak_memory(model: str, args: list, streams: int, tokens: int, size: int) -> float:
    server = Server(model, *args)
    try:
        threads = [threading.Thread(target=server.stream, args=(user(300 + i, size, "Tell a long story."), tokens, []))
                   for i in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return round(server.peak_rss_mb(), 1)
    finally:
        server.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--export", required=True, help="exported model folder (e.g. the int4 2B export)")
    p.add_argument("--image-size", type=int, default=448, help="side of each client's square image (default 448)")
    p.add_argument("--streams", default="1,2,4,8", help="concurrency levels (default 1,2,4,8)")
    p.add_argument("--tokens", type=int, default=160, help="tokens per stream in the throughput runs")
    p.add_argument("--repeats", type=int, default=3, help="runs per concurrency level (median reported)")
    p.add_argument("--long-tokens", type=int, default=1000, help="tokens per stream in the memory runs")
    p.add_argument("--prefill-chunk", type=int, default=128)
    p.add_argument("--skip-memory", action="store_true", help="skip the (long) peak-RSS runs")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra option for the server (repeatable), e.g. --server-arg=--batch-invariant")
    p.add_argument("--out", default="bench-out/serving.json")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.streams.split(",")]
    common = ["--prefill-chunk", str(args.prefill_chunk), "--max-queue", "16", *args.server_arg]
    result = {"machine": machine.describe(), "export": os.path.abspath(args.export), "image_size": args.image_size,
              "tokens_per_stream": args.tokens, "server_args": common}
    server = Server(args.export, "--parallel", str(max(levels)), *common)
    try:
        runs = {n: [] for n in levels}
        for r in range(args.repeats):  # interleaved: each round runs every level once, so a load change hits all
            for n in levels:
                run = concurrent(server, n, args.tokens, args.image_size, seed=1000 * r + 10 * n)
                run["load_average"] = [round(x, 2) for x in os.getloadavg()]
                runs[n].append(run)
                print(f"round {r + 1}, {n} streams: {run['tokens_per_s']} tok/s (load {run['load_average']})", flush=True)
        result["throughput"] = {str(n): {"median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                                         "min_tokens_per_s": min(r["tokens_per_s"] for r in rs),
                                         "max_tokens_per_s": max(r["tokens_per_s"] for r in rs),
                                         "runs": rs} for n, rs in runs.items()}
        # the ratio to one stream within each round (the runs of one round share the host's load)
        one = runs.get(1)
        if one:
            for n, rs in runs.items():
                ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(one, rs)]
                result["throughput"][str(n)]["vs_one_stream_by_round"] = [round(x, 3) for x in ratios]
        result["gap"] = gap_during_prefill(server, args.image_size, args.prefill_chunk)
        result["follow_up"] = follow_up(server, args.image_size)
        result["engine"] = server.health().get("engine")
    finally:
        server.stop()
    if not args.skip_memory:
        one = peak_memory(args.export, ["--parallel", "4", *common], 1, args.long_tokens, args.image_size)
        four = peak_memory(args.export, ["--parallel", "4", *common], 4, args.long_tokens, args.image_size)
        result["memory"] = {"one_stream_peak_mb": one, "four_streams_peak_mb": four, "extra_mb": round(four - one, 1),
                            "tokens_per_stream": args.long_tokens}
    write_json(args.out, result)
    print(table(result))
    print(f"wrote {args.out}")
    return 0


def table(result: dict) -> str:
    """The README's table."""
    lines = ["| measure | value | target |", "|---|---|---|"]
    base = result["throughput"].get("1", {}).get("median_tokens_per_s")
    for n, entry in result["throughput"].items():
        tps = entry["median_tokens_per_s"]
        ratio = f" ({tps / base:.2f}x one stream)" if base and n != "1" else ""
        if entry.get("vs_one_stream_by_round") and n != "1":
            by_round = entry["vs_one_stream_by_round"]
            ratio += f"; by round {min(by_round):.2f}-{max(by_round):.2f}x"
        if entry.get("min_tokens_per_s") is not None and len(entry["runs"]) > 1:
            ratio += f"; runs {entry['min_tokens_per_s']:.1f}-{entry['max_tokens_per_s']:.1f} tok/s"
        target = {"4": ">= 2.0x", "8": ">= 2.4x"}.get(n, "")
        lines.append(f"| aggregate decode, {n} stream(s) | {tps:.1f} tok/s{ratio} | {target} |")
    gap = result["gap"]
    lines.append(f"| longest gap of a running stream while a {gap['newcomer_prompt_tokens']}-token image prompt "
                 f"is prefilled | {gap['longest_gap_s']:.2f} s (steady step {gap['steady_step_s']:.3f} s) | "
                 f"<= one chunk + one step |")
    fu = result["follow_up"]
    lines.append(f"| follow-up TTFT vs first turn | {fu['follow_up_ttft_s']:.2f} s vs {fu['first_ttft_s']:.2f} s "
                 f"({fu['ratio']:.2f}x; {fu['follow_up_cached_tokens']}/{fu['follow_up_prompt_tokens']} tokens "
                 f"cached) | <= 0.15x |")
    if "memory" in result:
        m = result["memory"]
        lines.append(f"| peak RSS, 4 x {m['tokens_per_stream']} tokens vs 1 stream | {m['four_streams_peak_mb']:.0f} MB"
                     f" vs {m['one_stream_peak_mb']:.0f} MB (+{m['extra_mb']:.0f} MB) | <= +600 MB |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
