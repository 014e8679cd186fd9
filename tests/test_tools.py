"""Tool calls (runtime/chat/tools.py): tools rendered by the chat template exactly as transformers renders them,
the model's <tool_call> blocks parsed into OpenAI tool_calls (streamed and not), "required" and named choices
constrained so that the random-weight model's call always parses and fits the function's parameters, a tool
round trip through the official openai client, and bad tools / tool_choice refused naming the field."""
from __future__ import annotations

import json

import pytest

from vlm_core.kernels.sampling import SamplingParams
from vlm_core.runtime.chat.tools import ToolCallParser

pytest.importorskip("llguidance", reason="constrained tool calls need the 'structured' extra (llguidance)")
jsonschema = pytest.importorskip("jsonschema", reason="the arguments are validated with jsonschema (test extra)")

# Bounded arguments (enums, integers with bounds, maxLength): a random-weight model never closes a free string.
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "days"],
                   "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                  "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                  "unit": {"enum": ["C", "F"]}}}}}
ZOOM = {"type": "function", "function": {
    "name": "zoom", "description": "Crop the image.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["box"],
                   "properties": {"box": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999},
                                          "minItems": 4, "maxItems": 4},
                                  "label": {"type": "string", "maxLength": 6}}}}}
TOOLS = [WEATHER, ZOOM]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
GREEDY = SamplingParams(greedy=True)


def check_call(name: str, arguments: str) -> None:
    assert name in PARAMETERS
    jsonschema.validate(json.loads(arguments), PARAMETERS[name])


# --- parsing ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, content, calls", [
    ('<tool_call>\n{"name": "zoom", "arguments": {"box": [1, 2, 3, 4]}}\n</tool_call>', "",
     [("zoom", '{"box": [1, 2, 3, 4]}')]),
    ('Let me look.\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", '
     '"arguments": "{\\"x\\": 1}"}\n</tool_call>', "Let me look.", [("a", "{}"), ("b", '{"x": 1}')]),
    ("no calls here  \n", "no calls here  \n", []),
    ("x <tool_call>not json</tool_call> y", "x <tool_call>not json</tool_call> y", []),  # stays content
    ('cut <tool_call>\n{"name": "a", "argu', 'cut <tool_call>\n{"name": "a", "argu', []),  # unclosed: content
    ("ends with <tool_ca", "ends with <tool_ca", []),
])
def test_tool_call_blocks_split_the_same_streamed_and_whole(text, content, calls):
    parser = ToolCallParser(make_id=lambda: "call_1")  # the whole answer in one delta
    content_whole, calls_whole = parser.feed(text)
    whole = (content_whole + parser.close()[0], calls_whole)
    assert (whole[0], [(c.name, c.arguments) for c in whole[1]]) == (content, calls)
    parser, pieces, streamed = ToolCallParser(make_id=lambda: "call_1"), [], []
    for character in text:  # one character per delta: every split point
        piece, done = parser.feed(character)
        pieces.append(piece)
        streamed += done
    pieces.append(parser.close()[0])
    assert ("".join(pieces), streamed) == whole


# --- rendering ----------------------------------------------------------------------------------------

def history(arguments) -> list:
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
            {"role": "tool", "tool_call_id": "call_2", "content": "sunny"},
            {"role": "assistant", "content": "21 and sunny.", "tool_calls": [
                {"id": "call_3", "type": "function", "function": {"name": "zoom", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "call_3", "content": [{"type": "text", "text": "done"}]},
            {"role": "user", "content": "Thanks."}]


@pytest.fixture(scope="module")
def hf_tokenizer(qwen_checkpoint):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(qwen_checkpoint)


@pytest.mark.parametrize("messages, tools", [
    ([{"role": "user", "content": "Hi"}], TOOLS),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], [ZOOM]),
    (history('{"city": "Paris", "days": 2}'), TOOLS),  # arguments as OpenAI sends them (a JSON string)
    (history({"city": "Paris", "days": 2}), TOOLS),  # as transformers' docs show them (a dict)
    (history({"city": "Paris", "days": 2}), None),
])
def test_tools_and_tool_messages_render_as_transformers_does(vlm, hf_tokenizer, messages, tools):
    expected = hf_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert vlm.render(messages, tools)[0] == expected


# --- generation ---------------------------------------------------------------------------------------

def test_required_and_named_choices_always_give_a_call_that_fits(vlm):
    prompts = ["Weather?", "Crop the cup.", "Hello.", "What now?"]
    for prompt, choice in zip(prompts, ["required", "required", {"type": "function", "function": {"name": "zoom"}},
                                        {"type": "function", "function": {"name": "get_weather"}}]):
        result = vlm.generate([{"role": "user", "content": prompt}], GREEDY, max_new_tokens=80, tools=TOOLS,
                              tool_choice=choice, parallel_tool_calls=False)
        assert result.finish_reason == "tool_calls" and len(result.tool_calls) == 1, result
        call = result.tool_calls[0]
        check_call(call.name, call.arguments)
        if isinstance(choice, dict):
            assert call.name == choice["function"]["name"]
        assert result.text == ""
    free = vlm.generate([{"role": "user", "content": prompts[0]}], GREEDY, max_new_tokens=16, tools=TOOLS)
    assert free.tool_calls == [] and free.text  # "auto": the noise model writes no call


def test_chat_session_keeps_calls_in_the_history(vlm):
    chat = vlm.chat(sampling=GREEDY, max_new_tokens=60, tools=TOOLS, tool_choice="required",
                    parallel_tool_calls=False)
    result = chat.send({"role": "user", "content": "Weather in Rome?"})
    call = result.tool_calls[0]
    assert chat.messages[-1]["tool_calls"] == [call.to_dict()]
    answer = chat.send({"role": "tool", "tool_call_id": call.id, "content": "sunny"}, tool_choice="auto",
                       max_new_tokens=4)
    assert answer.cached_tokens > 0  # the call, re-rendered by the template, is the same tokens the model wrote


def test_bad_tools_are_refused_naming_the_field(vlm):
    from vlm_core.errors import ParameterError

    messages = [{"role": "user", "content": "Hi"}]
    for kwargs, param in [({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                           "tool_choice"),
                          ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
                          ({"tool_choice": "required"}, "tool_choice"),
                          ({"tools": [{"type": "retrieval"}]}, "tools"),
                          ({"tools": {"name": "x"}}, "tools"),
                          ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
                           "response_format")]:
        with pytest.raises(ParameterError) as error:
            vlm.generate(messages, GREEDY, max_new_tokens=4, **kwargs)
        assert error.value.param == param, (kwargs, error.value)


# --- server -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(qwen_export):
    pytest.importorskip("starlette", reason="the server needs the 'serve' extra")
    from test_serve import Server

    srv = Server(qwen_export)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai", reason="the official openai client is a test dependency")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("stream", [False, True])
def test_tool_round_trip_with_the_openai_client(client, stream):
    messages = [{"role": "user", "content": "What is the weather in Oslo?"}]
    options = {"model": "qwen3-vl-tiny-onnx", "temperature": 0, "max_tokens": 80, "tools": TOOLS}
    if stream:
        calls, content, finish = {}, "", None
        for chunk in client.chat.completions.create(messages=messages, tool_choice="required", stream=True,
                                                    **options):
            delta = chunk.choices[0].delta
            content += delta.content or ""
            for part in delta.tool_calls or []:
                entry = calls.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = part.id or entry["id"]
                entry["name"] += part.function.name or ""
                entry["arguments"] += part.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        assert calls and finish == "tool_calls" and content == ""
        tool_calls = [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                      for _, c in sorted(calls.items())]
    else:
        answer = client.chat.completions.create(messages=messages, tool_choice="required", **options)
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        tool_calls = [call.model_dump() for call in choice.message.tool_calls]
    for call in tool_calls:
        assert call["id"].startswith("call_")
        check_call(call["function"]["name"], call["function"]["arguments"])
    messages += [{"role": "assistant", "content": None, "tool_calls": tool_calls}]
    messages += [{"role": "tool", "tool_call_id": call["id"], "content": "-3 C, snow"} for call in tool_calls]
    answer = client.chat.completions.create(messages=messages, tool_choice="none", **{**options, "max_tokens": 6})
    assert answer.choices[0].finish_reason == "length" and answer.choices[0].message.content
    assert answer.usage.prompt_tokens_details.cached_tokens > 0  # the history re-rendered to the same tokens


def test_bad_tool_requests_are_400s_naming_the_field(server):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    for extra, param in [({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                          "tool_choice"),
                         ({"tool_choice": "required"}, "tool_choice"),
                         ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
                         ({"tools": "get_weather"}, "tools"),
                         ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
                             "type": "object", "properties": {"x": {"type": "nonsense"}}}}}],
                           "tool_choice": "required"}, "tools"),
                         ({"functions": [WEATHER["function"]]}, "functions")]:
        status, _, answer = server.request("POST", "/v1/chat/completions", {**body, **extra})
        assert status == 400 and answer["error"]["param"] == param, (extra, answer)
        assert param in answer["error"]["message"]
