"""OpenAI batch files (`vlm-batch`, runtime/batch/): answers equal to the server's, bad lines as error lines,
output that is complete whenever it exists, and a killed run resumed without redoing finished lines."""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys

import pytest

pytest.importorskip("starlette", reason="vlm-batch needs the 'serve' extra (starlette)")
pytest.importorskip("uvicorn", reason="the reference server needs the 'serve' extra (uvicorn)")
from inprocess_server import InProcessServer, import_httpx, wait_for  # noqa: E402

httpx = import_httpx()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(ROOT, "assets", "astronaut.jpg")
SCHEMA = {"type": "json_schema", "json_schema": {"name": "item", "strict": True, "schema": {
    "type": "object", "properties": {"name": {"type": "string"}, "count": {"type": "integer"}},
    "required": ["name", "count"], "additionalProperties": False}}}


def image_url() -> str:
    with open(IMAGE, "rb") as f:
        return "data:image/jpeg;base64," + base64.b64encode(f.read()).decode()


def request_line(custom_id: str, body: dict) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})


def twenty_lines() -> tuple[list[str], dict]:
    """20 input lines: text, images, a JSON-schema answer, a body the server refuses, and two malformed lines
    (lines 6 and 15). Returns (lines, {custom_id: body} of the 18 request lines)."""
    photo = image_url()
    bodies = {}
    for i in range(10):
        bodies[f"text-{i}"] = {"messages": [{"role": "user", "content": f"Write about the number {i}."}],
                               "max_tokens": 6 + i % 3, "temperature": 0}
    for i in range(5):
        bodies[f"image-{i}"] = {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": photo}}, {"type": "text", "text": f"Describe part {i}."}]}],
            "max_tokens": 5, "temperature": 0}
    bodies["schema"] = {"messages": [{"role": "user", "content": "An item as JSON."}], "max_tokens": 40,
                        "temperature": 0, "response_format": SCHEMA}
    bodies["sampled"] = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0.8,
                         "seed": 7}
    bodies["refused"] = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": -3}
    lines = [request_line(custom_id, body) for custom_id, body in bodies.items()]
    lines.insert(5, "{this is not JSON")
    lines.insert(14, json.dumps({"custom_id": "wrong-url", "method": "POST", "url": "/v1/embeddings", "body": {}}))
    return lines, bodies


def write_lines(path, lines) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def comparable(body: dict) -> dict:
    """A chat-completions answer without what differs between two runs of the same body: ids, times, and how
    much of the prompt the prefix cache held (it depends on what ran before)."""
    if "choices" not in body:
        return body
    usage = {k: v for k, v in body["usage"].items() if k != "prompt_tokens_details"}
    return {"choices": body["choices"], "usage": usage, "model": body["model"]}


def run_cli(model: str, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vlm_core.runtime.batch", "-m", model, "--threads", "1", *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_twenty_lines_give_the_servers_answers_and_two_error_lines(qwen_export, tmp_path):
    pytest.importorskip("llguidance", reason="the JSON-schema line needs the 'structured' extra")
    from vlm_core.runtime.server.app import create_app
    from vlm_core.runtime.server.config import ServeConfig

    lines, bodies = twenty_lines()
    requests, output = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    write_lines(requests, lines)
    process = run_cli(qwen_export, "-i", str(requests), "-o", str(output), "--parallel", "3")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert "20 lines: 20 answered now (3 with errors)" in stderr and "tok/s" in stderr
    assert not os.path.exists(str(output) + ".partial")
    records = read_records(output)
    assert len(records) == 20
    # in input order; the two malformed lines are error lines with response null, naming their line
    assert [r["custom_id"] for r in records] == [json.loads(line).get("custom_id") if line.startswith("{\"")
                                                 else None for line in lines]
    line_errors = [r for r in records if r["response"] is None]
    assert [(r["error"]["code"], r["error"]["line"]) for r in line_errors] == [("invalid_json", 6),
                                                                             ("invalid_url", 15)]
    answers = {r["custom_id"]: r for r in records if r["response"] is not None}
    assert len(answers) == 18 and all(r["id"].startswith("batch_req_") for r in records)
    config = ServeConfig(model=qwen_export, threads=1, parallel=3)
    with InProcessServer(create_app(config)) as server:
        for custom_id, body in bodies.items():
            reference = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
            record = answers[custom_id]
            assert record["response"]["status_code"] == reference.status_code, custom_id
            assert comparable(record["response"]["body"]) == comparable(reference.json()), custom_id
    refused = answers["refused"]
    assert refused["response"]["status_code"] == 400 and refused["error"]["message"]
    assert all(answers[c]["error"] is None and answers[c]["response"]["request_id"].startswith("chatcmpl-")
               for c in bodies if c != "refused")
    choice = answers["schema"]["response"]["body"]["choices"][0]
    if choice["finish_reason"] == "stop":  # the grammar completed (else the random model ran out of tokens)
        assert set(json.loads(choice["message"]["content"])) == {"name", "count"}


def test_killed_halfway_then_resumed_without_redoing_finished_lines(qwen_export, tmp_path):
    lines = [request_line(f"slow-{i}", {"messages": [{"role": "user", "content": f"Count {i}"}],
                                        "max_tokens": 120, "min_tokens": 120, "temperature": 0})
             for i in range(12)]
    requests, output = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    partial = tmp_path / "results.jsonl.partial"
    write_lines(requests, lines)
    first = run_cli(qwen_export, "-i", str(requests), "-o", str(output), "--parallel", "1", "--no-progress")
    try:
        wait_for(lambda: partial.exists() and partial.read_text().count("\n") >= 4, timeout=120,
                 what="4 answers in the partial file")
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    # killed: no output file is presented as complete; what was finished is in the partial file
    assert not output.exists()
    kept = {r["custom_id"]: r for r in read_records(partial)}
    assert 4 <= len(kept) < 12
    with open(partial, "a", encoding="utf-8") as f:
        f.write('{"id": "batch_req_cut", "custom_id": "slo')  # a line cut short by the kill is dropped
    second = run_cli(qwen_export, "-i", str(requests), "-o", str(output), "--parallel", "2", "--no-progress")
    _, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr
    assert f"{12 - len(kept)} answered now (0 with errors), {len(kept)} resumed from an earlier run" in stderr
    records = read_records(output)
    assert [r["custom_id"] for r in records] == [f"slow-{i}" for i in range(12)]
    for record in records:
        if record["custom_id"] in kept:  # the very line the first run wrote (its id), not a new answer
            assert record == kept[record["custom_id"]]
        assert record["response"]["status_code"] == 200
        assert record["response"]["body"]["usage"]["completion_tokens"] == 120
    assert not partial.exists()
    # a third run finds every line answered and rewrites the same file
    third = run_cli(qwen_export, "-i", str(requests), "-o", str(output), "--no-progress")
    _, stderr = third.communicate(timeout=300)
    assert third.returncode == 0 and "0 answered now (0 with errors), 12 resumed" in stderr
    assert read_records(output) == records
