"""The HTTP server (`python -m vlm_core.runtime.server`): OpenAI client parity with the CLI, streaming, concurrency,
the bounded queue, disconnects, hostile input, auth, and the chat page in a real (headless) browser.

Servers run as subprocesses on free loopback ports with the tiny exported model (`qwen_export`)."""
from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("starlette", reason="the server needs the 'serve' extra (starlette, uvicorn)")
pytest.importorskip("uvicorn", reason="the server needs the 'serve' extra (starlette, uvicorn)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "Describe."
IMAGE = os.path.join(ROOT, "assets", "astronaut.jpg")  # the tiny random model answers it in readable pieces
N_TOKENS = 12
LONG = {"max_tokens": 3000, "min_tokens": 3000}  # ~20 s of decoding for the tiny model: holds a worker
# How long a wait on the server's counters may take before the test fails: generous, since a loaded host is
# slow; what a test checks is the counter (queued, admitted, cancelled, tokens decoded), never the clock.
WAIT_S = 120


class Server:
    def __init__(self, model: str, *args: str):
        cmd = [sys.executable, "-m", "vlm_core.runtime.server", "-m", model, "--port", "0", "--threads", "1",
               "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        deadline = time.monotonic() + WAIT_S  # waits for the "listening on" line, not for a time
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            match = re.search(r"on http://127\.0\.0\.1:(\d+)/", line)
            if match:
                self.port = int(match.group(1))
                break
        else:
            line = ""
        if not getattr(self, "port", None):
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.lines))
        self.url = f"http://127.0.0.1:{self.port}"
        # keep draining its output so the pipe never fills
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def request(self, method: str, path: str, body=None, headers=None, timeout=60):
        """(status, headers, parsed JSON or text) of one request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers=hdrs)
        response = conn.getresponse()
        data = response.read().decode("utf-8", "replace")
        conn.close()
        try:
            data = json.loads(data)
        except ValueError:
            pass
        return response.status, dict(response.getheaders()), data

    def health(self) -> dict:
        return self.request("GET", "/health")[2]

    def wait_for(self, condition, what: str, timeout: float = WAIT_S) -> dict:
        """Poll /health until `condition(health)` holds and return that health; fail after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            health = self.health()
            if condition(health):
                return health
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} (waited {timeout:g} s): {health}")
            time.sleep(0.02)

    def wait_idle(self, timeout: float = WAIT_S) -> dict:
        """Nothing running or queued, in the scheduler and in the engine."""
        def idle(health):
            engine = health["engine"] or {}
            return (health["active"] == 0 and health["queued"] == 0
                    and not any(engine.get(k) for k in ("waiting", "prefilling", "decoding")))
        return self.wait_for(idle, "the server did not become idle", timeout)


def data_url(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    kind = "jpeg" if path.endswith((".jpg", ".jpeg")) else "png"
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def image_messages(path: str, text: str = PROMPT) -> list:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(path)}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def server(qwen_export):
    srv = Server(qwen_export, "--max-body-mb", "2")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def expected(qwen_export, photos) -> dict:
    """What `python -m vlm_core.runtime.generate --greedy` answers: the reference for every greedy request here."""
    out = subprocess.run([sys.executable, "-m", "vlm_core.runtime.generate", "-m", qwen_export, "--image", IMAGE,
                          "-p", PROMPT, "--greedy", "--max-new-tokens", str(N_TOKENS), "--threads", "1", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai", reason="the official openai client is a test dependency")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_matches_the_cli(server, client, expected, photos):
    models = client.models.list()
    assert [m.id for m in models.data] == ["qwen3-vl-tiny-onnx"]
    messages = image_messages(IMAGE)

    answer = client.chat.completions.create(model="qwen3-vl-tiny-onnx", messages=messages, temperature=0,
                                            max_tokens=N_TOKENS)
    assert answer.choices[0].message.content == expected["text"]
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == expected["finish_reason"]
    assert answer.usage.prompt_tokens == expected["prompt_tokens"]
    assert answer.usage.completion_tokens == len(expected["token_ids"])
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens

    stream = client.chat.completions.create(model="qwen3-vl-tiny-onnx", messages=messages, temperature=0,
                                            max_completion_tokens=N_TOKENS, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) > 1  # really streamed, piece by piece
    assert "".join(deltas) == expected["text"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == expected["finish_reason"] and not any(finishes[:-1])
    assert chunks[-1].usage.completion_tokens == len(expected["token_ids"])
    assert chunks[-1].usage.prompt_tokens == expected["prompt_tokens"]

    # stop strings cut the text (string or list)
    cut = expected["text"][len(expected["text"]) // 2:][:3]
    if cut.strip():
        stopped = client.chat.completions.create(model="qwen3-vl-tiny-onnx", messages=messages, temperature=0,
                                                 max_tokens=N_TOKENS, stop=[cut])
        assert stopped.choices[0].finish_reason == "stop"
        assert expected["text"].startswith(stopped.choices[0].message.content)
        assert cut not in stopped.choices[0].message.content


def test_concurrent_streams_and_memory(server, client, expected, photos):
    messages = image_messages(IMAGE)

    def one(results, i):
        try:
            stream = client.chat.completions.create(model="qwen3-vl-tiny-onnx", messages=messages, temperature=0,
                                                    max_tokens=N_TOKENS, stream=True)
            results[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        except Exception as e:  # reported below
            results[i] = e

    def burst(n=4):
        results = [None] * n
        threads = [threading.Thread(target=one, args=(results, i)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        return results

    assert burst() == [expected["text"]] * 4
    server.wait_idle()
    before = server.rss_mb()
    for _ in range(3):
        assert burst() == [expected["text"]] * 4
    server.wait_idle()
    after = server.rss_mb()
    # Each generation's KV cache and activations are freed when it ends; what may stay is allocator slack
    # (glibc arenas, ONNX Runtime's arena) -- tens of MB at most, not growth per request.
    assert after < before + 40, (before, after)


def test_concurrent_different_streams_equal_what_each_gives_alone(qwen_export, photos):
    """Five requests (different images or none, prompts, lengths, greedy and seeded sampling) streamed at once
    by the official client, joining at staggered times while a long one decodes: each answer equals the one
    it gets alone."""
    openai = pytest.importorskip("openai", reason="the official openai client is a test dependency")
    srv = Server(qwen_export, "--parallel", "4", "--cache-mb", "0", "--prefill-chunk", "16")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        requests = [
            # The first is long, so the others join while it decodes however fast the host is (a fixed
            # stagger let every request finish before the next arrived on a fast host).
            ([{"role": "user", "content": "Write a poem about the sea."}],
             {"temperature": 0.9, "top_p": 0.9, "seed": 3, "max_tokens": 300}),
            (image_messages(photos["astronaut"], "What is this?"), {"temperature": 0, "max_tokens": 24}),
            (image_messages(photos["coffee"], "Describe the colours."), {"temperature": 0, "max_tokens": 9}),
            ([{"role": "user", "content": "Hi"}], {"temperature": 1.1, "seed": 8, "max_tokens": 16}),
            (image_messages(photos["noise"]), {"temperature": 0.7, "seed": 1, "max_tokens": 20}),
        ]
        first_text = threading.Event()

        def ask(messages, options):
            stream = client.chat.completions.create(model="qwen3-vl-tiny-onnx", messages=messages, stream=True, **options)
            parts = []
            for c in stream:
                if c.choices and c.choices[0].delta.content:
                    parts.append(c.choices[0].delta.content)
                    first_text.set()
            return "".join(parts)

        alone = [ask(m, o) for m, o in requests]
        admitted = srv.wait_idle()["engine"]["admitted"]
        first_text.clear()
        results = [None] * len(requests)

        def one(i):
            try:
                if i:  # join once the long request is decoding, each after the one before it was admitted
                    if not first_text.wait(WAIT_S):
                        raise AssertionError("the long request never streamed")
                    srv.wait_for(lambda h: h["engine"]["admitted"] >= admitted + i, f"request {i - 1} not admitted")
                results[i] = ask(*requests[i])
            except Exception as e:  # reported by the assertion below
                results[i] = e

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert results == alone
        assert srv.health()["engine"]["widest_batch"] >= 2  # they really were decoded together
    finally:
        srv.stop()


def test_follow_up_reports_cached_tokens(server, client, photos):
    messages = image_messages(photos["coffee"], "What is this?")
    first = client.chat.completions.create(model="qwen3-vl-tiny-onnx", messages=messages, temperature=0, max_tokens=6)
    history = messages + [{"role": "assistant", "content": first.choices[0].message.content},
                          {"role": "user", "content": "Tell me more."}]
    second = client.chat.completions.create(model="qwen3-vl-tiny-onnx", messages=history, temperature=0, max_tokens=6)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    health = server.health()
    assert health["engine"]["cache"]["prefix_entries"] >= 1 and health["engine"]["parallel"] >= 1


def test_disconnect_mid_stream_frees_the_worker(server, client, expected, photos):
    decoded_before = server.wait_idle()["engine"]["decoder_tokens"]
    stream = client.chat.completions.create(model="qwen3-vl-tiny-onnx", messages=image_messages(IMAGE),
                                            temperature=0, stream=True, extra_body=LONG)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert server.health()["active"] == 1
    stats_before = server.health()["stats"]
    stream.close()  # the client goes away mid-answer
    health = server.wait_idle()  # the worker, and the engine's slot, are free again
    assert health["stats"].get("cancelled", 0) == stats_before.get("cancelled", 0) + 1
    assert health["stats"].get("completed", 0) == stats_before.get("completed", 0)  # stopped, not run out
    # promptly, counted in tokens: the engine stopped decoding it long before the 3000 it was asked for
    decoded = health["engine"]["decoder_tokens"] - decoded_before
    assert decoded < LONG["min_tokens"], decoded
    answer = client.chat.completions.create(model="qwen3-vl-tiny-onnx", messages=image_messages(IMAGE),
                                            temperature=0, max_tokens=N_TOKENS)
    assert answer.choices[0].message.content == expected["text"]


def test_disconnect_of_a_non_streamed_request_frees_its_slot(server, photos):
    """A non-streamed request whose client leaves mid-answer is cancelled, and its slot freed, at once however
    fast its tokens come (the tiny model's come milliseconds apart, under the 0.25 s poll that used to watch)."""
    stats_before = server.wait_idle()["stats"]
    conn = _open_stream(server.port, {"messages": image_messages(photos["coffee"]), "temperature": 0, **LONG}, {})
    decoding = server.wait_for(lambda h: h["active"] == 1 and h["engine"]["decoding"], "the request never decoded")
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away without reading an answer
    conn.close()
    health = server.wait_idle()
    assert health["stats"].get("cancelled", 0) == stats_before.get("cancelled", 0) + 1, health
    assert health["stats"].get("completed", 0) == stats_before.get("completed", 0), health  # not run to its end
    # at once, counted in tokens: a few after the disconnect (the poll it replaces waited for a 0.25 s gap between
    # tokens, which came at any point of the 3000 or never)
    decoded = health["engine"]["decoder_tokens"] - decoding["engine"]["decoder_tokens"]
    assert decoded < 100, decoded


def _open_stream(port: int, body: dict, headers: dict) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json", **headers})
    return conn


def test_queue_full_auth_and_cancelled_waiters(qwen_export, photos):
    srv = Server(qwen_export, "--parallel", "1", "--max-queue", "1", "--api-key", "sekrit")
    try:
        auth = {"Authorization": "Bearer sekrit"}
        # auth: /v1 needs the key; the page and /health do not
        status, headers, body = srv.request("GET", "/v1/models")
        assert status == 401 and body["error"]["type"] == "authentication_error"
        assert srv.request("GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert srv.request("POST", "/v1/chat/completions", {"messages": []})[0] == 401
        assert srv.request("GET", "/v1/models", headers=auth)[0] == 200
        assert srv.request("GET", "/health")[0] == 200
        assert srv.request("GET", "/")[0] == 200

        body = {"messages": image_messages(photos["coffee"]), "stream": True, "temperature": 0, **LONG}
        running = _open_stream(srv.port, body, auth)
        first = running.getresponse()
        assert first.status == 200
        first.fp.readline()  # streaming has started
        waiting = _open_stream(srv.port, body, auth)
        health = srv.wait_for(lambda h: h["queued"] >= 1 or h["stats"].get("rejected"), "nothing was queued")
        assert health["queued"] == 1 and health["active"] == 1
        status, headers, error = srv.request("POST", "/v1/chat/completions", body, headers=auth)
        assert status == 429  # the scheduler raises QueueFull at submission: refused at once, not queued
        assert error["error"]["type"] == "rate_limit_error" and "busy" in error["error"]["message"]
        assert headers.get("retry-after") or headers.get("Retry-After")
        health = srv.health()
        assert health["queued"] == 1 and health["active"] == 1 and health["stats"]["rejected"] == 1, health
        # both clients go away: the running generation stops, the queued one never starts
        for conn in (waiting, running):
            conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()
        first.close()
        health = srv.wait_idle()
        assert health["stats"]["rejected"] == 1
        # both ended cancelled; the running one did not decode its 3000 tokens first
        assert health["stats"].get("cancelled") == 2 and "completed" not in health["stats"], health
        status, _, answer = srv.request("POST", "/v1/chat/completions",
                                        {"messages": image_messages(photos["coffee"]), "temperature": 0,
                                         "max_tokens": 4}, headers=auth, timeout=20)
        assert status == 200 and answer["usage"]["completion_tokens"] >= 1
    finally:
        srv.stop()


def _png(size, mode="RGB") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _with_image(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "hi"}]}], "max_tokens": 4}


def _read_reply(sock) -> str:
    """A raw HTTP reply: read until the JSON body is complete or the server closes."""
    data = b""
    while True:
        try:
            piece = sock.recv(65536)
        except OSError:
            break
        if not piece:
            break
        data += piece
        head, _, body = data.partition(b"\r\n\r\n")
        match = re.search(rb"content-length: (\d+)", head, re.I)
        if match and len(body) >= int(match.group(1)):
            break
    return data.decode("utf-8", "replace")


def test_hostile_input_gets_4xx_and_the_server_keeps_serving(server, photos):
    bomb = _png((20000, 20000), "1")  # 400 M pixels in a few tens of KB
    assert len(bomb) < 200_000
    with open(photos["coffee"], "rb") as f:
        png = f.read()
    b64 = lambda data: "data:image/png;base64," + base64.b64encode(data).decode()  # noqa: E731
    text = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = {
        "malformed JSON": (b'{"messages": [', 400, "not valid JSON"),
        "not an object": ([1, 2], 400, "JSON object"),
        "messages not a list": ({"messages": "hi"}, 400, "messages"),
        "message without role": ({"messages": [{"content": "hi"}]}, 400, "role"),
        "content wrong type": ({"messages": [{"role": "user", "content": 5}]}, 400, "content"),
        "unknown part": ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "type"),
        "max_tokens wrong type": ({**text, "max_tokens": "ten"}, 400, "max_tokens"),
        "max_tokens zero": ({**text, "max_tokens": 0}, 400, "max_tokens"),
        "temperature negative": ({**text, "temperature": -1}, 400, "temperature"),
        "top_p out of range": ({**text, "top_p": 1.5}, 400, "top_p"),
        "stream not bool": ({**text, "stream": "yes"}, 400, "stream"),
        "presence_penalty": ({**text, "presence_penalty": 0.5}, 400, "presence_penalty"),
        "n > 1": ({**text, "n": 2}, 400, "'n'"),
        "unknown model": ({**text, "model": "gpt-4o"}, 404, "not served"),
        "not an image": (_with_image(b64(b"hello, world")), 400, "not an image"),
        "truncated image": (_with_image(b64(png[: len(png) // 2])), 400, "truncated"),
        "20000x20000 PNG": (_with_image(b64(bomb)), 400, "pixels"),
        "bad base64": (_with_image("data:image/png;base64,@@@not*base64!!"), 400, "base64"),
        "data URL not base64": (_with_image("data:image/png,abc"), 400, "base64"),
        "remote URL": (_with_image("https://example.com/cat.png"), 400, "remote image URLs are disabled"),
        "local file path": (_with_image(photos["coffee"]), 400, "never read"),
        "file URL": (_with_image("file://" + photos["coffee"]), 400, "never read"),
        "too many images": ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": b64(_png((8, 8)))}}] * 9}]}, 400, "too many images"),
        "too many tokens": ({**text, "max_tokens": 100_000}, 400, "context"),
    }
    for name, (body, want_status, want_text) in cases.items():
        status, _, answer = server.request("POST", "/v1/chat/completions",
                                           body if isinstance(body, (dict, list)) else body)
        assert status == want_status, (name, status, answer)
        error = answer["error"]
        assert set(error) == {"message", "type", "param", "code"}, (name, answer)
        assert want_text.lower() in (error["message"] + " " + str(error["param"])).lower(), (name, error)

    # a body over --max-body-mb (2 MiB) is refused from its Content-Length, before it is read
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 50000000\r\n\r\n" + b"{" * 1000)
        reply = _read_reply(sock)
    assert reply.startswith("HTTP/1.1 413") and "request_too_large" in reply, reply[:300]
    # ... and one sent in full without a Content-Length (chunked) is cut off while reading
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        piece = b" " * 65536
        try:
            for _ in range(40):  # 2.5 MiB
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        except OSError:
            pass  # the server answered and closed already
        reply = _read_reply(sock)
    assert reply.startswith("HTTP/1.1 413") and "request_too_large" in reply, reply[:300]

    assert server.request("GET", "/v1/nothing")[0] == 404
    assert server.request("GET", "/v1/chat/completions")[0] == 405
    status, _, answer = server.request("POST", "/v1/chat/completions", {**_with_image(data_url(photos["coffee"]))})
    assert status == 200 and answer["choices"][0]["message"]["content"] is not None
    assert server.health()["status"] == "ok"


def _error(answer) -> dict:
    assert set(answer["error"]) == {"message", "type", "param", "code"}, answer
    return answer["error"]


def test_nonsense_once_accepted_is_a_400_naming_the_field(server):
    """Values that used to be accepted without a word (issue 20), each refused with `param` naming the field
    and a message that says what is allowed."""
    hi = [{"role": "user", "content": "hi"}]
    text = {"messages": hi, "max_tokens": 2}
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    cases = {
        "user content null": ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", "null"),
        "user content []": ({"messages": [{"role": "user", "content": []}]}, "messages[0].content", "needs text"),
        "user content empty": ({"messages": [{"role": "user", "content": ""}]}, "messages[0].content", "needs text"),
        "both length fields": ({**text, "max_completion_tokens": 2}, "max_tokens", "not both"),
        "temperature above 2": ({**text, "temperature": 2.5}, "temperature", "from 0 to 2"),
        "temperature 1e30": ({**text, "temperature": 1e30}, "temperature", "from 0 to 2"),
        "repetition_penalty 1e308": ({**text, "repetition_penalty": 1e308}, "repetition_penalty", "at most 10"),
        "seed -1": ({**text, "seed": -1}, "seed", "non-negative"),
        "top_k -5": ({**text, "top_k": -5}, "top_k", "from 0 to 1,000,000"),
        "video budget without a video": ({**text, "video_max_frames": 4}, "video_max_frames", "no video"),
        "include_usage not a bool": ({**text, "stream": True, "stream_options": {"include_usage": "yes"}},
                                     "stream_options.include_usage", "true or false"),
        "name not a string": ({"messages": [{"role": "user", "content": "hi", "name": 5}]}, "messages[0].name",
                              "string"),
        "tool message without tool_call_id": (
            {"messages": [*hi, {"role": "assistant", "content": None, "tool_calls": [call]},
                          {"role": "tool", "content": "sunny"}]}, "messages[2].tool_call_id", "tool call"),
    }
    for name, (body, param, says) in cases.items():
        status, _, answer = server.request("POST", "/v1/chat/completions", body)
        assert status == 400, (name, status, answer)
        error = _error(answer)
        assert error["param"] == param and says in error["message"], (name, error)
    # an image the model cannot take is named by its part, not as a PIL object inside 'messages'
    thin = "data:image/png;base64," + base64.b64encode(_png((4000, 2))).decode()
    status, _, answer = server.request("POST", "/v1/chat/completions", _with_image(thin))
    error = _error(answer)
    assert status == 400 and error["param"] == "messages[0].content[0].image_url", answer
    assert "aspect ratio" in error["message"] and "PIL" not in error["message"], error
    # the fields each alone, and the name that errors use for the length field, are as before
    status, _, answer = server.request("POST", "/v1/chat/completions", {"messages": hi, "max_completion_tokens": 0})
    assert status == 400 and _error(answer)["param"] == "max_completion_tokens", answer
    for fields in ({"max_completion_tokens": 2}, {"max_tokens": 2, "seed": 2 ** 63 + 5, "top_k": -1},
                   {"max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}):
        status, _, answer = server.request("POST", "/v1/chat/completions", {"messages": hi, **fields})
        assert status == 200, (fields, answer)


def test_only_json_bodies_and_no_cors_by_default(server):
    """A text/plain or form body (what a cross-site page can send without a CORS preflight) is a 415 naming
    Content-Type; without --cors-origin no answer carries an Access-Control-Allow-Origin header."""
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.putrequest("POST", "/v1/chat/completions")
        if content_type:
            conn.putheader("Content-Type", content_type)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        answer = json.loads(response.read())
        conn.close()
        assert response.status == 415, (content_type, answer)
        assert "Content-Type: application/json" in _error(answer)["message"], answer
    status, headers, answer = server.request("POST", "/v1/chat/completions", body,
                                             {"Content-Type": "application/json; charset=utf-8",
                                              "Origin": "http://elsewhere.example"})
    assert status == 200, answer
    assert not any(k.lower().startswith("access-control-") for k in headers), headers
    status, headers, _ = server.request("OPTIONS", "/v1/chat/completions", headers={
        "Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST"})
    assert status == 405 and not any(k.lower().startswith("access-control-") for k in headers), headers


@pytest.fixture(scope="module")
def guarded(qwen_export):
    """A server that allows one other origin, waits 2 s for a body, holds at most 8 connections and resizes each
    image to at most 64 image tokens (--max-pixels 65536: 64 x 32 x 32)."""
    srv = Server(qwen_export, "--cors-origin", "http://app.example", "--body-timeout", "2", "--max-connections", "8",
                 "--max-pixels", "65536")
    yield srv
    srv.stop()


def test_cors_origin_allows_the_origins_named(guarded):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    status, headers, _ = guarded.request("OPTIONS", "/v1/chat/completions",
                                         headers={"Origin": "http://app.example", **preflight})
    headers = {k.lower(): v for k, v in headers.items()}
    assert status == 200 and headers["access-control-allow-origin"] == "http://app.example", headers
    status, headers, _ = guarded.request("OPTIONS", "/v1/chat/completions",
                                         headers={"Origin": "http://elsewhere.example", **preflight})
    assert status == 400 and "access-control-allow-origin" not in {k.lower() for k in headers}, headers
    status, headers, answer = guarded.request("POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, {"Origin": "http://app.example"})
    assert status == 200 and {k.lower(): v for k, v in headers.items()}["access-control-allow-origin"] == \
        "http://app.example", (headers, answer)


HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


def wait_for_lines(server: Server, condition, what: str) -> list:
    """The server's output lines once `condition(lines)` holds; fail after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while not condition(lines := list(server.lines)):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}:\n" + "".join(lines))
        time.sleep(0.02)
    return lines


def test_a_body_that_never_arrives_is_a_408_and_a_client_gone_one_line(guarded):
    """A Content-Length larger than the body sent, or a chunked body cut short, ends at --body-timeout with a 408
    (and the connection closed); a client that leaves while sending its body is one log line, no traceback."""
    for request in (HEAD + b"Content-Length: 100\r\n\r\n{}",
                    HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\n{}"):
        with socket.create_connection(("127.0.0.1", guarded.port), timeout=WAIT_S) as sock:
            sock.sendall(request)
            reply = _read_reply(sock)
            assert reply.startswith("HTTP/1.1 408") and "request_timeout" in reply, reply[:300]
            assert "connection: close" in reply.lower() and sock.recv(1) == b"", reply[:300]  # and closed
    # a malformed chunk size is the HTTP parser's 400, and the body it interrupts is one line too
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=WAIT_S) as sock:
        sock.sendall(HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n")
        assert _read_reply(sock).startswith("HTTP/1.1 400")
    for _ in range(3):  # clients that leave with their body half sent
        with socket.create_connection(("127.0.0.1", guarded.port), timeout=WAIT_S) as sock:
            sock.sendall(HEAD + b"Content-Length: 100\r\n\r\n{\"messages\"")
    gone = "disconnected while sending its request body"
    lines = wait_for_lines(guarded, lambda lines: sum(gone in line for line in lines) >= 4,
                           "the clients that left were not logged")
    assert sum(gone in line for line in lines) == 4, "".join(lines)
    assert not any("Traceback" in line or "Exception in ASGI" in line for line in lines), "".join(lines)
    assert guarded.health()["status"] == "ok"


def test_max_connections_caps_open_connections(guarded):
    """--max-connections 8: with 7 connections open and idle, an eighth is answered 503; closing them frees it."""
    idle = [socket.create_connection(("127.0.0.1", guarded.port), timeout=WAIT_S) for _ in range(7)]
    try:
        deadline = time.monotonic() + WAIT_S
        while (status := guarded.request("GET", "/health")[0]) != 503:  # once the server has seen all 7
            assert status == 200 and time.monotonic() < deadline, "never refused a connection over the cap"
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + WAIT_S
    while (status := guarded.request("GET", "/health")[0]) != 200:
        assert time.monotonic() < deadline, f"still {status} after the idle connections closed"


def test_image_budget_flags_and_fields(server, guarded):
    """--max-pixels / --min-pixels and the request fields max_pixels / min_pixels bound each image's area after
    resizing, as the CLI's flags do (64 image tokens here); a request may lower the server's --max-pixels only."""
    def prompt_tokens(srv, **fields):
        status, _, answer = srv.request("POST", "/v1/chat/completions",
                                        {"messages": image_messages(IMAGE), "max_tokens": 1, **fields})
        assert status == 200, (fields, answer)
        return answer["usage"]["prompt_tokens"]

    full, small = prompt_tokens(server), prompt_tokens(server, max_pixels=65536)
    text_tokens = full - 100  # astronaut.jpg (320x320) is 10 x 10 image tokens of 32 x 32 pixels by default
    assert small == text_tokens + 64 and prompt_tokens(guarded) == small, (full, small)
    assert prompt_tokens(guarded, max_pixels=16384) == text_tokens + 16  # lowered by the request
    assert prompt_tokens(server, min_pixels=512 * 512 * 4) == text_tokens + 1024  # min_pixels enlarges
    cases = {
        "not positive": (server, {"max_pixels": 0}, "max_pixels", "positive integer"),
        "not an integer": (server, {"min_pixels": "lots"}, "min_pixels", "positive integer"),
        "past the context": (server, {"max_pixels": 10 ** 12}, "max_pixels", "at most"),
        "below one token": (server, {"max_pixels": 100}, "max_pixels", "at least 1024"),
        "min above max": (server, {"min_pixels": 200_000, "max_pixels": 100_000}, "min_pixels", "larger than"),
        "raising the server's": (guarded, {"max_pixels": 100_000}, "max_pixels", "--max-pixels (65536)"),
        "min above the server's max": (guarded, {"min_pixels": 100_000}, "min_pixels", "larger than"),
    }
    for name, (srv, fields, param, says) in cases.items():
        status, _, answer = srv.request("POST", "/v1/chat/completions",
                                        {"messages": image_messages(IMAGE), "max_tokens": 1, **fields})
        error = _error(answer)
        assert status == 400 and error["param"] == param and says in error["message"], (name, error)
    status, _, answer = server.request("POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "max_pixels": 65536})
    assert status == 400 and _error(answer)["param"] == "max_pixels" and "no image" in answer["error"]["message"]


def test_max_images_counts_the_new_turn(server):
    """The page resends a conversation's earlier images with each turn: --max-images (8 here) bounds the images
    after the last assistant message, so a 10th image in a conversation is answered; the conversation may hold
    8 x --max-images in all."""
    png = lambda i: "data:image/png;base64," + base64.b64encode(_png((8, 8 + i))).decode()

    def conversation(turns: int, last: int = 1) -> list:
        messages = []
        for i in range(turns):
            messages += [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png(i)}},
                                                      {"type": "text", "text": "and this?"}]},
                         {"role": "assistant", "content": "a picture"}]
        return messages + [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png(turns + j)}}
                                                         for j in range(last)] + [{"type": "text", "text": "this?"}]}]

    status, _, answer = server.request("POST", "/v1/chat/completions", {"messages": conversation(9), "max_tokens": 1})
    assert status == 200, answer
    status, _, answer = server.request("POST", "/v1/chat/completions",
                                       {"messages": conversation(1, last=9), "max_tokens": 1})
    error = _error(answer)
    assert status == 400 and error["code"] == "too_many_images" and "9 in the new messages" in error["message"]
    assert "--max-images" in error["message"], error
    status, _, answer = server.request("POST", "/v1/chat/completions", {"messages": conversation(64), "max_tokens": 1})
    error = _error(answer)
    assert status == 400 and "start a new conversation" in error["message"], error
    assert error["param"] == "messages[128].content[0]", error  # the 65th image
    # videos are counted the same way
    from vlm_core.runtime.server import schema

    clip = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}
    turns = [{"role": "user", "content": [clip]}, {"role": "assistant", "content": "a clip"}] * 5
    assert len(schema.parse_chat_request({"messages": turns + [{"role": "user", "content": [clip]}]}, 8, 4).videos) == 6
    with pytest.raises(schema.ParameterError, match="5 in the new messages, at most 4"):
        schema.parse_chat_request({"messages": turns + [{"role": "user", "content": [clip] * 5}]}, 8, 4)


def test_text_that_is_not_unicode_is_a_400_naming_the_field(server):
    """Lone surrogates (a JSON escape, or their UTF-8-like bytes) and invalid UTF-8 bytes are refused, not a 500."""
    text_part = b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi TEXT"}]}], "max_tokens": 2}'
    string = b'{"messages": [{"role": "user", "content": "hi TEXT"}], "max_tokens": 2}'
    cases = {
        "escaped lone surrogate": (text_part.replace(b"TEXT", b"\\ud800"), "messages[0].content[0].text"),
        "escaped lone low surrogate": (string.replace(b"TEXT", b"\\udfff!"), "messages[0].content"),
        "surrogate as raw bytes": (string.replace(b"TEXT", b"\xed\xa0\x80"), "messages[0].content"),
        "invalid UTF-8 bytes": (text_part.replace(b"TEXT", b"\xff\xfe caf\xe9"), "messages[0].content[0].text"),
        "stop string": (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stop": ["a", "\\ud83d"]}',
                        "stop[1]"),
    }
    for name, (body, param) in cases.items():
        status, _, answer = server.request("POST", "/v1/chat/completions", body)
        assert status == 400, (name, status, answer)
        error = _error(answer)
        assert error["param"] == param and error["type"] == "invalid_request_error", (name, error)
        assert "utf-8" in error["message"].lower(), (name, error)
    # a valid surrogate pair (an emoji, escaped) is fine
    status, _, answer = server.request("POST", "/v1/chat/completions", string.replace(b"TEXT", b"\\ud83d\\ude00"))
    assert status == 200, answer


def test_deeply_nested_json_is_a_400(server):
    for depth in (100_000, 200):
        body = b'{"messages": [{"role": "user", "content": "hi"}], "metadata": ' + b"[" * depth + b"]" * depth + b"}"
        status, _, answer = server.request("POST", "/v1/chat/completions", body)
        assert status == 400, (depth, status, answer)
        assert "nested" in _error(answer)["message"], answer
    status, _, answer = server.request("POST", "/v1/chat/completions", b"[" * 100_000)  # not even closed
    assert status == 400 and _error(answer), answer
    assert server.health()["status"] == "ok"


def test_a_queued_request_whose_client_left_frees_its_place_at_once(qwen_export, photos):
    srv = Server(qwen_export, "--parallel", "1", "--max-queue", "1")
    conns = []
    try:
        body = {"messages": image_messages(photos["coffee"]), "stream": True, "temperature": 0, **LONG}
        conns.append(_open_stream(srv.port, body, {}))
        first = conns[0].getresponse()
        assert first.status == 200
        first.fp.readline()  # the worker is busy for ~20 s
        waiting = _open_stream(srv.port, body, {})
        health = srv.wait_for(lambda h: h["queued"] >= 1 or h["stats"].get("rejected"), "nothing was queued")
        assert health["queued"] == 1
        waiting.sock.shutdown(socket.SHUT_RDWR)  # the queued client goes away
        waiting.close()
        health = srv.wait_for(lambda h: h["queued"] == 0, "the queued request kept its place")
        # freed now, not when the worker is free: the long generation is still running, not completed
        assert health["queued"] == 0 and health["active"] == 1, health
        assert health["stats"].get("cancelled") == 1 and "completed" not in health["stats"], health
        conns.append(_open_stream(srv.port, body, {}))  # a newcomer takes the place instead of a 429
        health = srv.wait_for(lambda h: h["queued"] >= 1 or h["stats"].get("rejected"), "the newcomer was not queued")
        assert health["queued"] == 1 and health["stats"].get("rejected", 0) == 0, health
    finally:
        for conn in conns:
            if conn.sock:
                conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()
        srv.stop()


CHROMIUM = "/usr/bin/chromium"


@contextlib.contextmanager
def chromium_page():
    """A page in headless Debian Chromium (driven by playwright), closed afterwards."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is a test dependency")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        try:
            yield browser.new_page(viewport={"width": 900, "height": 700})
        finally:
            browser.close()


def open_greedy_page(page, server, max_tokens: int = N_TOKENS) -> None:
    """Load the chat page, wait for the model's name, set greedy decoding and `max_tokens` in its settings."""
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('qwen3-vl-tiny-onnx')")
    # open/close the settings panel by state, not by toggling clicks (robust on a loaded machine)
    page.evaluate("document.getElementById('settings').open = true")
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#temperature", "0")
    page.evaluate("document.getElementById('settings').open = false")


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (apt-get install chromium)")
def test_chat_page_in_a_real_browser(server, expected, photos, tmp_path):
    with chromium_page() as page:
        external = []
        page.on("request", lambda r: None if r.url.startswith(server.url) else external.append(r.url))
        open_greedy_page(page, server)
        page.set_input_files("#file", IMAGE)
        page.wait_for_selector("#attachments img")
        page.fill("#prompt", PROMPT)
        page.click("#send")
        page.wait_for_function("document.querySelector('.assistant .text') && "
                               "document.querySelector('.assistant .text').textContent.length > 0")
        page.wait_for_selector(".assistant .stats[data-finish]:not([data-finish=''])", timeout=30_000)
        answer = page.text_content(".assistant .text")
        stats = page.text_content(".assistant .stats")
        assert answer == expected["text"]
        assert "first token" in stats and "tokens/s" in stats, stats
        assert page.locator(".user img").count() == 1

        # a long answer stopped with the stop button frees the server's worker
        page.evaluate("document.getElementById('settings').open = true")
        page.fill("#max-tokens", "3000")
        page.evaluate("document.getElementById('settings').open = false")
        page.fill("#prompt", "Again, at length.")
        decoded_before = server.wait_idle()["engine"]["decoder_tokens"]
        page.click("#send")
        page.wait_for_function("document.querySelectorAll('.assistant .text')[1] && "
                               "document.querySelectorAll('.assistant .text')[1].textContent.length > 20")
        page.click("#stop")
        page.wait_for_selector(".assistant .stats[data-finish='stopped']", timeout=WAIT_S * 1000)
        # freed promptly, counted in tokens: the engine stopped long before the 3000 the page asked for
        decoded = server.wait_idle()["engine"]["decoder_tokens"] - decoded_before
        assert decoded < 3000, decoded
        shot = tmp_path / "serve-screenshot.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 1000
        if os.environ.get("VLM_UPDATE_SCREENSHOT"):  # refresh the README's picture on request only
            os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
            shutil.copy(shot, os.path.join(ROOT, "docs", "serve-screenshot.png"))
        assert external == [], external  # nothing from a CDN


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (apt-get install chromium)")
def test_chat_page_drops_a_failed_turn(server, tmp_path):
    """A turn that fails (here a broken image) shows its error, leaves no empty answer bubble, and is not sent
    again with the next question, which is answered."""
    with chromium_page() as page:
        sent = []
        page.on("request", lambda r: sent.append(json.loads(r.post_data))
                if r.url.endswith("/v1/chat/completions") else None)
        open_greedy_page(page, server, 4)

        page.set_input_files("#file", files=[{"name": "broken.png", "mimeType": "image/png",
                                              "buffer": b"this is not a PNG"}])
        page.wait_for_selector("#attachments img")
        page.fill("#prompt", "What is in the picture?")
        page.click("#send")
        page.wait_for_selector(".msg.error", timeout=30_000)
        page.wait_for_function("!document.getElementById('send').disabled")
        assert "not an image" in page.text_content(".msg.error")
        assert page.locator(".msg.user.failed").count() == 1  # still visible, marked as failed
        assert page.locator(".msg.assistant").count() == 0  # no empty "0 tokens" answer
        assert "0 tokens" not in page.text_content("#log")

        page.fill("#prompt", "Describe.")
        page.click("#send")
        page.wait_for_selector(".assistant .stats[data-finish]:not([data-finish=''])", timeout=30_000)
        assert page.locator(".msg.error").count() == 1  # the second question did not fail
        assert len(sent) == 2
        assert sent[1]["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Describe."}]}]
        page.screenshot(path=str(tmp_path / "failed-turn.png"), full_page=True)


def test_refuses_public_host_without_key(qwen_export):
    out = subprocess.run([sys.executable, "-m", "vlm_core.runtime.server", "-m", qwen_export, "--host", "0.0.0.0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--api-key" in out.stderr


def test_refuses_a_cors_origin_that_is_not_an_origin(qwen_export):
    out = subprocess.run([sys.executable, "-m", "vlm_core.runtime.server", "-m", qwen_export, "--cors-origin",
                          "https://app.example/"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 2 and "--cors-origin 'https://app.example/' is not an origin" in out.stderr, out.stderr


def test_refuses_an_image_budget_that_cannot_work(qwen_export):
    for flags, says in ((["--max-pixels", "0"], "--max-pixels must be a positive integer"),
                        (["--min-pixels", "5000", "--max-pixels", "4096"], "--min-pixels (5000) is larger"),
                        (["--max-pixels", "100"], "--max-pixels must be at least 1024"),  # the model's, once loaded
                        (["--min-pixels", str(10 ** 12)], "--min-pixels must be at most")):
        out = subprocess.run([sys.executable, "-m", "vlm_core.runtime.server", "-m", qwen_export, "--threads", "1",
                              *flags], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr, (flags, out.stderr)


def test_refuses_a_blank_api_key_at_start(qwen_export):
    """A key of spaces (or one a header cannot carry) would refuse every client: refused before the model loads."""
    for key in ("   ", " sekrit", "tab\tkey"):
        out = subprocess.run([sys.executable, "-m", "vlm_core.runtime.server", "-m", qwen_export, "--api-key", key],
                             cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 2 and "--api-key" in out.stderr and "Traceback" not in out.stderr, (key, out.stderr)
        assert not key.strip() or key.strip() not in out.stderr  # the key itself is not printed
