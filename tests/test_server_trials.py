"""The server trial of issue 20 as a table: each row one HTTP request (the hostile ones tried, and the ordinary
ones that must still be answered), the status it must get, the `param` its error must name and fragments of its
message.

All rows go to one in-process server over the session's tiny model (tests/inprocess_server.py), and a second one
with an API key for the auth rows. Every row: the status; for an error, OpenAI's error shape, `param` (when the
row names one) and the fragments; and nothing the server logs holds a traceback or an error record.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from inprocess_server import InProcessServer, LogRecords, import_httpx  # noqa: E402

API_KEY = "trial-key"
HI = [{"role": "user", "content": "hi"}]
TEXT = {"messages": HI, "max_tokens": 2}
CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def _png(size, mode="RGB") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    color = {"1": 0, "L": 90, "RGBA": (90, 120, 200, 128)}.get(mode, (90, 120, 200))
    Image.new(mode, size, color).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def _image(url, text: str = "hi", **extra) -> dict:
    part = {"type": "image_url", "image_url": {"url": url}} if isinstance(url, str) else url
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": text}, part]}], "max_tokens": 2,
            **extra}


def _gif(frames: int = 4) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    images = [Image.new("RGB", (48, 40), (40 * i, 90, 200 - 30 * i)) for i in range(frames)]
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=100)
    return buffer.getvalue()


def _rows() -> dict:
    """name -> (request, status, param or None, fragments). A request is a dict body (sent as JSON), bytes, or
    {"raw": bytes, "headers": {...}, "method", "path", "auth": True (the keyed server)}."""
    png, gif = _png((64, 48)), _gif()
    rows = {}

    def error(name, request, param, *fragments, status=400):
        rows[name] = (request, status, param, list(fragments))

    def ok(name, request):
        rows[name] = (request, 200, None, [])

    body = json.dumps(TEXT).encode()
    # Content-Type: only application/json (a text/plain post needs no CORS preflight)
    for content_type in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                         "multipart/form-data; boundary=x", "text/json", "application/javascript", None):
        headers = {} if content_type is None else {"Content-Type": content_type}
        error(f"content-type {content_type}", {"raw": body, "headers": headers}, None, "Content-Type: application/json",
              status=415)
    ok("content-type application/json; charset=utf-8",
       {"raw": body, "headers": {"Content-Type": "application/json; charset=utf-8"}})
    ok("content-type Application/JSON", {"raw": body, "headers": {"Content-Type": "Application/JSON"}})

    # the body as JSON
    error("malformed JSON", b'{"messages": [', None, "not valid JSON")
    error("empty body", b"", None, "JSON")
    error("not an object", [1, 2], None, "JSON object")
    error("a string", "hi", None, "JSON object")
    error("deeply nested", b'{"messages": [], "metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}", None, "nested")
    error("invalid UTF-8 in a text part",
          b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "caf\xe9"}]}], "max_tokens": 2}',
          "messages[0].content[0].text", "UTF-8")
    error("lone surrogate", b'{"messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 2}',
          "messages[0].content", "UTF-8")

    # messages
    error("no messages", {"max_tokens": 2}, "messages", "messages")
    error("messages empty", {"messages": []}, "messages", "non-empty list")
    error("messages a string", {"messages": "hi"}, "messages", "messages")
    error("message not an object", {"messages": ["hi"]}, "messages[0]", "role")
    error("message without role", {"messages": [{"content": "hi"}]}, "messages[0].role", "role")
    error("role unknown", {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "robot")
    error("user content null", {"messages": [{"role": "user", "content": None}]}, "messages[0].content", "null")
    error("user content []", {"messages": [{"role": "user", "content": []}]}, "messages[0].content", "needs text")
    error('user content ""', {"messages": [{"role": "user", "content": ""}]}, "messages[0].content", "needs text")
    error("content a number", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string")
    error("content an object", {"messages": [{"role": "user", "content": {"text": "hi"}}]}, "messages[0].content",
          "string")
    error("name: 5", {"messages": [{"role": "user", "content": "hi", "name": 5}]}, "messages[0].name", "string")
    error("part without type", {"messages": [{"role": "user", "content": [{"text": "hi"}]}]},
          "messages[0].content[0].type", "type")
    error("part type audio", {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
          "messages[0].content[0].type", "audio")
    error("text part not a string", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
          "messages[0].content[0].text", "string")
    error("function_call in a message", {"messages": [{"role": "assistant", "content": "x",
                                                       "function_call": {"name": "f"}}, *HI]},
          "messages[0].function_call", "tool_calls")
    error("tool message without tool_call_id",
          {"messages": [*HI, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                        {"role": "tool", "content": "sunny"}]}, "messages[2].tool_call_id", "tool call")
    error("tool_calls not a list", {"messages": [*HI, {"role": "assistant", "content": None, "tool_calls": "f"}, *HI]},
          "messages[1].tool_calls", "list")
    error("tool_calls entry malformed", {"messages": [*HI, {"role": "assistant", "content": None,
                                                            "tool_calls": [{"id": 1}]}, *HI]},
          "messages[1].tool_calls[0]", "function")
    error("image in an assistant message",
          {"messages": [*HI, {"role": "assistant", "content": [{"type": "image_url",
                                                                "image_url": {"url": _url(png)}}]}, *HI]},
          "messages[1].content[0]", "user messages")
    ok("system, developer, user, assistant, user",
       {"messages": [{"role": "system", "content": "Be brief."}, {"role": "developer", "content": "Really."}, *HI,
                     {"role": "assistant", "content": "Hello."}, *HI], "max_tokens": 2})
    ok("name a string", {"messages": [{"role": "user", "content": "hi", "name": "ann"}], "max_tokens": 2})
    ok("tool round trip", {"messages": [*HI, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                                        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}],
                           "tools": [TOOL], "max_tokens": 2})
    ok("text parts", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 2})

    # lengths
    error("both max_tokens fields", {**TEXT, "max_completion_tokens": 2}, "max_tokens", "not both")
    for field in ("max_tokens", "max_completion_tokens"):
        for value, says in ((0, "max"), (-1, "max"), ("ten", "integer"), (2.5, "integer"), (True, "integer"),
                            (100_000, "context")):
            request = {"messages": HI, field: value}
            param = "messages" if says == "context" else field
            error(f"{field} {value!r}", request, param, says)
        ok(f"{field} 2", {"messages": HI, field: 2})
    error("min_tokens over max_tokens", {**TEXT, "min_tokens": 5}, "min_tokens", "max")
    error("min_tokens -1", {**TEXT, "min_tokens": -1}, "min_tokens", "min_tokens")
    ok("min_tokens 2", {**TEXT, "min_tokens": 2})

    # sampling: OpenAI's ranges where it documents one
    bad = {"temperature": [(-1, "0 to 2"), (2.5, "0 to 2"), (1e30, "0 to 2"), ("hot", "number")],
           "top_p": [(0, "top_p"), (1.5, "top_p"), (-0.1, "top_p"), ("all", "number")],
           "top_k": [(-5, "from 0 to 1,000,000"), (10 ** 20, "from 0 to 1,000,000"), (2.5, "integer")],
           "min_p": [(2, "min_p"), (-1, "min_p")],
           "repetition_penalty": [(0, "repetition_penalty"), (-1, "repetition_penalty"), (1e308, "at most 10")],
           "seed": [(-1, "non-negative"), ("x", "integer"), (1.5, "integer")]}
    for field, values in bad.items():
        for value, fragment in values:
            error(f"{field} {value!r}", {**TEXT, field: value}, field, fragment)
    good = {"temperature": [0, 0.7, 2], "top_p": [1, 0.5], "top_k": [0, -1, 40], "min_p": [0, 0.05],
            "repetition_penalty": [1, 1.2], "seed": [0, 7, 2 ** 63 + 5]}
    for field, values in good.items():
        for value in values:
            ok(f"{field} {value!r}", {**TEXT, field: value})
    error("presence_penalty", {**TEXT, "presence_penalty": 0.5}, "presence_penalty", "repetition_penalty")
    error("frequency_penalty", {**TEXT, "frequency_penalty": 0.5}, "frequency_penalty", "repetition_penalty")
    ok("presence_penalty 0", {**TEXT, "presence_penalty": 0})
    error("n 2", {**TEXT, "n": 2}, "n", "'n' must be 1")
    ok("n 1", {**TEXT, "n": 1})
    error("logit_bias", {**TEXT, "logit_bias": {"1": 5}}, "logit_bias", "not supported")
    error("functions", {**TEXT, "functions": [{"name": "f"}]}, "functions", "tools")

    # stop
    error("stop five strings", {**TEXT, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most")
    error("stop a number", {**TEXT, "stop": 5}, "stop", "stop")
    error("stop empty string", {**TEXT, "stop": [""]}, "stop", "non-empty")
    error("stop lone surrogate", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, '
                                 b'"stop": ["a", "\\ud83d"]}', "stop[1]", "UTF-8")
    ok("stop a string", {**TEXT, "stop": "###"})
    ok("stop four strings", {**TEXT, "stop": ["a", "b", "c", "d"]})

    # streaming
    error("stream 'yes'", {**TEXT, "stream": "yes"}, "stream", "stream")
    error("stream_options.include_usage 'yes'", {**TEXT, "stream": True, "stream_options": {"include_usage": "yes"}},
          "stream_options.include_usage", "true or false")
    ok("stream", {**TEXT, "stream": True})
    ok("stream with usage", {**TEXT, "stream": True, "stream_options": {"include_usage": True}})

    # logprobs
    error("top_logprobs without logprobs", {**TEXT, "top_logprobs": 2}, "top_logprobs", "logprobs")
    error("top_logprobs 21", {**TEXT, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "20")
    error("logprobs 'yes'", {**TEXT, "logprobs": "yes"}, "logprobs", "logprobs")
    ok("logprobs with top_logprobs 3", {**TEXT, "logprobs": True, "top_logprobs": 3})

    # response formats and tools
    error("response_format unknown type", {**TEXT, "response_format": {"type": "yaml"}}, "response_format", "yaml")
    error("response_format a string", {**TEXT, "response_format": "json"}, "response_format", "response_format")
    error("json_schema without a schema", {**TEXT, "response_format": {"type": "json_schema", "json_schema": {}}},
          "response_format", "schema")
    error("tools not a list", {**TEXT, "tools": "f"}, "tools", "tools")
    error("tool without a function", {**TEXT, "tools": [{"type": "function"}]}, "tools", "tools[0]")
    error("tool_choice unknown function", {**TEXT, "tools": [TOOL], "tool_choice": {"type": "function",
                                                                                    "function": {"name": "g"}}},
          "tool_choice", "g")
    error("tool_choice 'maybe'", {**TEXT, "tools": [TOOL], "tool_choice": "maybe"}, "tool_choice", "maybe")
    ok("tools auto", {**TEXT, "tools": [TOOL]})
    ok("response_format text", {**TEXT, "response_format": {"type": "text"}})

    # images: each error names its part
    part = "messages[0].content[1].image_url"
    error("image not an image", _image(_url(b"hello, world")), part, "not an image")
    error("image truncated", _image(_url(png[: len(png) // 2])), part, "truncated")
    error("image 20000x20000 PNG", _image(_url(_png((20000, 20000), "1"))), part, "pixels")
    error("image 4000x2", _image(_url(_png((4000, 2)))), part, "aspect ratio")
    error("image 2x4000", _image(_url(_png((2, 4000)))), part, "aspect ratio")
    error("image bad base64", _image("data:image/png;base64,@@@not*base64!!"), part, "base64")
    error("image data URL not base64", _image("data:image/png,abc"), part, "base64")
    error("image remote URL", _image("https://example.com/cat.png"), part, "remote image URLs are disabled")
    error("image local path", _image("/etc/passwd"), part, "never read")
    error("image file URL", _image("file:///etc/passwd"), part, "never read")
    error("image url empty", _image(""), "messages[0].content[1].image_url", "non-empty")
    error("image url not a string", _image({"type": "image_url", "image_url": {"url": 5}}),
          "messages[0].content[1].image_url", "non-empty")
    error("image an SVG", _image(_url(b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml")), part,
          "not an image")
    error("image a PDF", _image(_url(b"%PDF-1.4\n1 0 obj <<>> endobj\n", "application/pdf")), part, "not an image")
    error("too many images", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _url(_png((8, 8 + i)))}} for i in range(9)]}], "max_tokens": 2},
          "messages", "too many images")
    ok("image png", _image(_url(png)))
    ok("image greyscale", _image(_url(_png((40, 30), "L"))))
    ok("image RGBA", _image(_url(_png((40, 30), "RGBA"))))
    ok("image 8x8", _image(_url(_png((8, 8)))))
    ok("two images", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _url(png)}}, {"type": "image_url", "image_url": {"url": _url(gif)}},
        {"type": "text", "text": "compare"}]}], "max_tokens": 2})

    # the image budget fields
    error("max_pixels 0", _image(_url(png), max_pixels=0), "max_pixels", "positive integer")
    error("max_pixels 100", _image(_url(png), max_pixels=100), "max_pixels", "at least 1024")
    error("max_pixels 10**12", _image(_url(png), max_pixels=10 ** 12), "max_pixels", "at most")
    error("min_pixels 'lots'", _image(_url(png), min_pixels="lots"), "min_pixels", "positive integer")
    error("min_pixels over max_pixels", _image(_url(png), min_pixels=200_000, max_pixels=100_000), "min_pixels",
          "larger than")
    error("max_pixels without an image", {**TEXT, "max_pixels": 65536}, "max_pixels", "no image")
    ok("max_pixels 65536", _image(_url(png), max_pixels=65536))

    # videos
    clip = {"type": "video_url", "video_url": {"url": _url(gif, "image/gif")}}
    for field, value in (("video_max_frames", 4), ("video_fps", 2), ("video_max_pixels", 100_000)):
        error(f"{field} without a video", {**TEXT, field: value}, field, "no video")
    error("video_fps 1e30", _image(clip, video_fps=1e30), "video_fps", "120")
    error("video_max_frames 0", _image(clip, video_max_frames=0), "video_max_frames", "positive")
    error("video a text file", _image({"type": "video_url", "video_url": {"url": _url(
        b"These are notes, not a video.\n" * 20, "video/mp4")}}), "messages[0].content[1].video_url", "not a video")
    error("video truncated GIF", _image({"type": "video_url", "video_url": {"url": _url(gif[: len(gif) // 2],
                                                                                      "image/gif")}}),
          "messages[0].content[1].video_url", "truncated")
    error("video local path", _image({"type": "video", "video": "/etc/passwd"}), "messages[0].content[1].video",
          "never read")
    ok("video GIF", _image(clip))
    ok("video GIF with a budget", _image(clip, video_fps=2, video_max_frames=4))

    # model, routes, methods, auth
    error("unknown model", {**TEXT, "model": "gpt-4o"}, "model", "not served", status=404)
    error("no such route", {"raw": body, "path": "/v1/nothing"}, None, "/v1/nothing", status=404)
    error("GET on completions", {"raw": b"", "method": "GET", "headers": {}}, None, "GET", status=405)
    error("auth: no key", {"raw": body, "auth": True}, None, "API key", status=401)
    error("auth: wrong key", {"raw": body, "auth": True, "headers": {"Content-Type": "application/json",
                                                                    "Authorization": "Bearer nope"}}, None,
          "API key", status=401)
    error("auth: not bearer", {"raw": body, "auth": True, "headers": {"Content-Type": "application/json",
                                                                     "Authorization": f"Basic {API_KEY}"}}, None,
          "API key", status=401)
    ok("auth: the key", {"raw": body, "auth": True, "headers": {"Content-Type": "application/json",
                                                               "Authorization": f"Bearer {API_KEY}"}})
    ok("models", {"raw": b"", "method": "GET", "path": "/v1/models", "headers": {}})
    ok("health", {"raw": b"", "method": "GET", "path": "/health", "headers": {}})
    return rows


ROWS = _rows()


@pytest.fixture(scope="module")
def servers(vlm):
    """(the plain server, the keyed one) over the session's model, and what their loggers wrote."""
    from vlm_core.runtime.server.app import create_app
    from vlm_core.runtime.server.config import ServeConfig

    records = LogRecords()
    loggers = [logging.getLogger(name) for name in ("vlm_core", "uvicorn", "uvicorn.error", "uvicorn.access")]
    for logger in loggers:
        logger.addHandler(records)
    plain = ServeConfig(model=vlm.folder, threads=1, max_queue=16)
    keyed = ServeConfig(model=vlm.folder, threads=1, api_key=API_KEY)
    with InProcessServer(create_app(plain, vlm)) as first, InProcessServer(create_app(keyed, vlm)) as second:
        yield first, second, records
    for logger in loggers:
        logger.removeHandler(records)


def _send(servers, request):
    httpx = import_httpx()
    plain, keyed, _ = servers
    if isinstance(request, dict) and "raw" in request:
        server = keyed if request.get("auth") else plain
        method, path = request.get("method", "POST"), request.get("path", "/v1/chat/completions")
        headers = request.get("headers", {"Content-Type": "application/json"})
        content = request["raw"]
    else:
        server, method, path, headers = plain, "POST", "/v1/chat/completions", {"Content-Type": "application/json"}
        content = request if isinstance(request, bytes) else json.dumps(request).encode()
    return httpx.request(method, server.url + path, content=content, headers=headers, timeout=120)


@pytest.mark.parametrize("name", list(ROWS))
def test_server_trial(name, servers):
    request, status, param, fragments = ROWS[name]
    records = servers[2].records
    seen = len(records)
    answer = _send(servers, request)
    report = f"{answer.status_code} {answer.text[:600]}"
    assert answer.status_code == status, report
    logged = records[seen:]
    assert not any(r.levelno >= logging.ERROR or r.exc_info for r in logged), [r.getMessage() for r in logged]
    assert "Traceback" not in answer.text, report
    if status == 200:
        if "text/event-stream" in answer.headers.get("content-type", ""):
            assert answer.text.rstrip().endswith("data: [DONE]") and '"error"' not in answer.text, report
        return
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, report
    if param is not None:
        assert error["param"] == param, report
    for fragment in fragments:
        assert fragment.lower() in error["message"].lower(), f"{fragment!r} not in the message\n{report}"
    assert "PIL" not in error["message"], report  # a part is named by where it is, not as a Python object


def test_the_table_is_broad():
    assert len(ROWS) >= 100
    assert sum(status == 200 for _, status, _, _ in ROWS.values()) >= 30
