"""The batch file format (OpenAI's Batch API, as vLLM's run_batch reads and writes it): one input line -> a
BatchRequest or a LineError; an answer -> one output line.

Input line:  ``{"custom_id": "a1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}``
Output line: ``{"id": "batch_req_...", "custom_id": "a1", "response": {"status_code": 200, "request_id":
"chatcmpl-...", "body": {...}}, "error": null}``

A request the server refuses keeps OpenAI's shape: ``response`` holds the status and the server's error body,
and ``error`` repeats its code and message (so ``error != null`` finds every failure). A line that is not a
request at all (not JSON, no custom_id, another URL) has ``response: null`` and ``error: {"code", "message",
"line"}``; such errors carry the line number and are not kept for resuming: they are found again at once.
Only the envelope is checked here; the body is checked by the server's own schema, when it is answered.
"""
from __future__ import annotations

import dataclasses
import json
import uuid

CHAT_URL = "/v1/chat/completions"
URLS = {CHAT_URL, "/chat/completions"}  # OpenAI writes the first; the second is the same route without /v1


@dataclasses.dataclass(frozen=True)
class BatchRequest:
    """A request line: its position (1-based), custom_id and the body to POST to /v1/chat/completions."""

    line: int
    custom_id: str
    body: dict


@dataclasses.dataclass(frozen=True)
class LineError:
    """A line that is not a request; `custom_id` when the line had a readable one."""

    line: int
    custom_id: str | None
    code: str
    message: str


def parse_line(text: str, line: int) -> BatchRequest | LineError | None:
    """One input line -> BatchRequest, LineError, or None for a blank line."""
    if not text.strip():
        return None
    try:
        item = json.loads(text)
    except ValueError as e:
        return LineError(line, None, "invalid_json", f"line {line} is not valid JSON ({e})")
    if not isinstance(item, dict):
        return LineError(line, None, "invalid_line", f"line {line} must be a JSON object with custom_id, method, "
                                                      f"url and body")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return LineError(line, None, "missing_custom_id", f"line {line}: 'custom_id' must be a non-empty string")
    method, url, body = item.get("method", "POST"), item.get("url"), item.get("body")
    if not isinstance(method, str) or method.upper() != "POST":
        return LineError(line, custom_id, "invalid_method", f"line {line}: 'method' must be \"POST\", got "
                                                            f"{json.dumps(method)[:40]}")
    if url not in URLS:
        return LineError(line, custom_id, "invalid_url", f"line {line}: 'url' must be \"{CHAT_URL}\" (the only "
                                                         f"endpoint a batch file can use here), got "
                                                         f"{json.dumps(url)[:80]}")
    if not isinstance(body, dict):
        return LineError(line, custom_id, "invalid_body", f"line {line}: 'body' must be a chat-completions request "
                                                          f"object")
    if body.get("stream"):
        return LineError(line, custom_id, "invalid_body", f"line {line}: 'stream' is not supported in a batch file "
                                                          f"(each answer is written whole); leave it out")
    return BatchRequest(line, custom_id, body)


def _record(custom_id, response, error) -> dict:
    return {"id": "batch_req_" + uuid.uuid4().hex[:24], "custom_id": custom_id, "response": response, "error": error}


def answer_record(request: BatchRequest, status: int, body) -> dict:
    """The output line for the server's answer to `request` (any status; `body` its parsed JSON)."""
    request_id = body.get("id") if isinstance(body, dict) and status < 400 else None
    error = None
    if status >= 400:
        detail = body.get("error", {}) if isinstance(body, dict) else {}
        error = {"code": detail.get("code") or detail.get("type") or str(status),
                 "message": detail.get("message") or f"HTTP {status}"}
    return _record(request.custom_id, {"status_code": status, "request_id": request_id, "body": body}, error)


def line_error_record(error: LineError) -> dict:
    """The output line for an input line that is not a request."""
    return _record(error.custom_id, None, {"code": error.code, "message": error.message, "line": error.line})


def is_line_error(record: dict) -> bool:
    """Whether an output line reports a line that was not a request (found again on resume, never skipped)."""
    error = record.get("error")
    return record.get("response") is None and isinstance(error, dict) and "line" in error


def completion_tokens(record: dict) -> int:
    """Tokens an output line's answer generated (0 for errors)."""
    body = (record.get("response") or {}).get("body")
    usage = body.get("usage") if isinstance(body, dict) else None
    return int(usage.get("completion_tokens", 0)) if isinstance(usage, dict) else 0
