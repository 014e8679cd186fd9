"""Constrained decoding (response_format, --json-schema / --json-object / --grammar) on the tiny random-weight
model, whose free output is noise: only the grammar can make it answer JSON that parses and fits a schema.

Twenty answers across five schemas and json_object, through the Python API, the CLI and the openai client,
all parse and validate with `jsonschema`; the same prompts unconstrained do not parse; a constrained request's
greedy tokens are the same alone and in a batch; bad schemas and grammars are refused naming the field."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("llguidance", reason="constrained decoding needs the 'structured' extra (llguidance)")
jsonschema = pytest.importorskip("jsonschema", reason="the answers are validated with jsonschema (test extra)")

from structured_cases import PROMPTS, SCHEMAS  # noqa: E402

from vlm_core.kernels.sampling import SamplingParams  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY = SamplingParams(greedy=True)

# For these the tiny model's constrained answer closes at once ("{}"); for most prompts it opens a key and
# never closes that free string (structured_cases.py), which max_tokens then cuts.
JSON_OBJECT_PROMPTS = ["Fill in the form.", "Count the cups."]
MAX_TOKENS = 96  # the longest schema answer here takes 37 tokens


def _schema_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def _messages(text: str) -> list:
    return [{"role": "user", "content": text}]


def _assert_valid(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema)


def _does_not_parse(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return True
    return False


def test_api_answers_fit_their_schemas_and_free_answers_do_not_parse(vlm):
    """12 answers (5 schemas x 2 prompts, json_object x 2), decoded together in one generate_batch."""
    cases = [(name, PROMPTS[(i + k) % len(PROMPTS)]) for i, name in enumerate(SCHEMAS) for k in range(2)]
    cases += [("json_object", prompt) for prompt in JSON_OBJECT_PROMPTS]
    formats = [{"type": "json_object"} if name == "json_object" else _schema_format(name) for name, _ in cases]
    prompts = [_messages(prompt) for _, prompt in cases]
    results = vlm.generate_batch(prompts, GREEDY, max_new_tokens=MAX_TOKENS, response_format=formats)
    for (name, prompt), result in zip(cases, results):
        assert result.finish_reason == "stop", (name, prompt, result.text)
        _assert_valid(result.text, SCHEMAS.get(name, {"type": "object"}))
    free = vlm.generate_batch(prompts, GREEDY, max_new_tokens=MAX_TOKENS)
    assert all(_does_not_parse(result.text) for result in free), [r.text for r in free]


def test_constrained_greedy_tokens_are_the_same_alone_and_in_a_batch(vlm):
    from batching_helpers import alone, run_schedule

    requests = [
        {"messages": _messages("Read the meter."), "sampling": GREEDY, "max_new_tokens": MAX_TOKENS,
         "response_format": _schema_format("meter")},
        {"messages": _messages("Describe the sea."), "sampling": GREEDY, "max_new_tokens": 20},  # free
        {"messages": _messages("Locate the objects."), "sampling": GREEDY, "max_new_tokens": MAX_TOKENS,
         "response_format": _schema_format("detections")},
        {"messages": _messages("Fill in the form."), "sampling": SamplingParams(temperature=0.8, seed=5),
         "max_new_tokens": MAX_TOKENS, "response_format": _schema_format("form")},
    ]
    together, _, widest = run_schedule(vlm, requests, [0, 0, 2, 5])
    assert widest >= 3
    assert together == alone(vlm, requests)
    text = vlm.tokenizer.decode(together[3], skip_special_tokens=True)  # sampled, yet valid
    _assert_valid(text, SCHEMAS["form"])


def test_a_lark_grammar_and_text_format(vlm):
    grammar = {"type": "grammar", "grammar": 'start: answer " " unit\nanswer: "yes" | "no"\nunit: /[0-9]{1,3}/ "kg"'}
    result = vlm.generate(_messages("Is it heavy?"), GREEDY, max_new_tokens=16, response_format=grammar)
    assert result.finish_reason == "stop"
    import re

    assert re.fullmatch(r"(yes|no) [0-9]{1,3}kg", result.text), result.text
    free = vlm.generate(_messages("Is it heavy?"), GREEDY, max_new_tokens=8)
    text = vlm.generate(_messages("Is it heavy?"), GREEDY, max_new_tokens=8, response_format={"type": "text"})
    assert text.token_ids == free.token_ids


def test_api_refuses_bad_formats_naming_the_parameter(vlm):
    from vlm_core.errors import ParameterError

    bad = [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}, "Invalid type"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}}}, "nope"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema must be a JSON schema"),
        ({"type": "grammar", "grammar": "start: missing"}, "unknown name"),
        ({"type": "yaml"}, "type must be one of"),
        ("json", "must be an object"),
    ]
    for response_format, message in bad:
        with pytest.raises(ParameterError, match=message) as error:
            vlm.generate(_messages("Hi"), GREEDY, max_new_tokens=4, response_format=response_format)
        assert error.value.param == "response_format"
        assert isinstance(error.value, ValueError)


def test_missing_llguidance_names_the_extra(monkeypatch):
    from vlm_core.errors import ParameterError
    from vlm_core.runtime.output.constraint import GrammarCompiler

    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance -> ImportError
    compiler = GrammarCompiler("unused.json", 10, [])
    with pytest.raises(ParameterError, match=r"vlm-core\[structured\]") as error:
        compiler.compile({"type": "json_object"})
    assert error.value.param == "response_format"
    assert compiler.compile({"type": "text"}) is None  # free text needs nothing


# --- CLI ------------------------------------------------------------------------------------------------

def _cli(argv: list, capsys) -> tuple[int, str, str]:
    from vlm_core.runtime.generate import main

    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_json_schema_and_json_object(qwen_export, tmp_path, capsys):
    """Three CLI answers: --json-schema twice (one loads no torch: the serve-time interpreter), --json-object."""
    path = tmp_path / "invoice.json"
    path.write_text(json.dumps(SCHEMAS["invoice"]))
    base = ["-m", qwen_export, "--greedy", "--max-new-tokens", str(MAX_TOKENS), "--threads", "2", "--json"]
    rc, out, err = _cli(base + ["-p", "Read the invoice.", "--json-schema", str(path)], capsys)
    assert rc == 0, err
    answer = json.loads(out)
    assert answer["finish_reason"] == "stop"
    _assert_valid(answer["text"], SCHEMAS["invoice"])
    rc, out, err = _cli(base + ["-p", JSON_OBJECT_PROMPTS[1], "--json-object"], capsys)
    assert rc == 0, err
    _assert_valid(json.loads(out)["text"], {"type": "object"})

    from test_no_torch import BLOCKER

    path = tmp_path / "labels.json"
    path.write_text(json.dumps(SCHEMAS["labels"]))
    argv = base + ["-p", "What is in the photo?", "--json-schema", str(path)]
    code = BLOCKER + f"from vlm_core.runtime.generate import main\nraise SystemExit(main({argv!r}))\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    _assert_valid(json.loads(proc.stdout)["text"], SCHEMAS["labels"])


@pytest.mark.parametrize("kind", ["invalid schema", "not JSON", "not an object", "missing file", "bad grammar",
                                  "two formats"])
def test_cli_bad_schema_or_grammar_exits_2_naming_the_flag(kind, tmp_path, capsys):
    path = tmp_path / "input"
    path.write_text({"invalid schema": '{"type": "foo"}', "not JSON": "{type: object", "not an object": "[1, 2]",
                     "bad grammar": "start: missing"}.get(kind, "{}"))
    flag = "--grammar" if kind == "bad grammar" else "--json-schema"
    argv = ["-m", str(tmp_path), "-p", "Hi", flag, str(path if kind != "missing file" else tmp_path / "nope.json")]
    if kind == "two formats":
        argv.append("--json-object")
        with pytest.raises(SystemExit) as exit_info:  # argparse: mutually exclusive
            _cli(argv, capsys)
        assert exit_info.value.code == 2
        assert "--json-object" in capsys.readouterr().err
        return
    rc, out, err = _cli(argv, capsys)  # refused before the (absent) model is loaded
    assert rc == 2
    assert err.startswith(f"error: {flag}") and len(err.strip().splitlines()) == 1, err


# --- server and the official openai client ------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(qwen_export):
    from test_serve import Server

    srv = Server(qwen_export)
    yield srv
    srv.stop()


def test_openai_client_response_format(server):
    """Five answers, one per schema (the last streamed), through the official client."""
    openai = pytest.importorskip("openai", reason="the official openai client is a test dependency")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    for i, name in enumerate(SCHEMAS):
        options = dict(model="qwen3-vl-tiny-onnx", messages=_messages(PROMPTS[(i + 2) % len(PROMPTS)]),
                       temperature=0, max_tokens=MAX_TOKENS, response_format=_schema_format(name))
        if i < len(SCHEMAS) - 1:
            answer = client.chat.completions.create(**options)
            text, finish = answer.choices[0].message.content, answer.choices[0].finish_reason
        else:
            chunks = [c for c in client.chat.completions.create(stream=True, **options) if c.choices]
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        assert finish == "stop", (name, text)
        _assert_valid(text, SCHEMAS[name])


def test_server_refuses_bad_formats_naming_the_field(server):
    base = {"model": "qwen3-vl-tiny-onnx", "messages": _messages("Hi"), "max_tokens": 4}
    cases = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
         "response_format", "Invalid type"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}},
         "response_format", "schema"),
        ({"response_format": {"type": "xml"}}, "response_format", "type must be one of"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "0 to 20"),
        ({"top_logprobs": 2}, "top_logprobs", "needs 'logprobs'"),
        ({"logprobs": "yes"}, "logprobs", "true or false"),
    ]
    for extra, param, message in cases:
        status, _, body = server.request("POST", "/v1/chat/completions", {**base, **extra})
        assert status == 400, (extra, body)
        assert body["error"]["param"] == param, body
        assert message in body["error"]["message"], body
    status, _, body = server.request("POST", "/v1/chat/completions", {**base, "response_format": {"type": "text"}})
    assert status == 200, body
