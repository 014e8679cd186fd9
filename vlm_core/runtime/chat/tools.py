"""Tool calls: OpenAI function tools in, the model's ``<tool_call>`` blocks out as OpenAI tool_calls.

The tools are rendered by the checkpoint's own chat template (transformers passes them to it as the
JSON-schema dicts given; Qwen3-VL's lists them in its system turn and asks for calls written as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

). `ToolCallParser` splits the answer's text into content and such calls, also while it streams (text
that may be the start of a block is held back). `tool_choice` decides what the model may do:

- ``"auto"`` (the default with tools): free text; the blocks it writes become tool calls.
- ``"none"``: the tools are still rendered (as vLLM does, so the prompt and its cached prefix are the
  same as with "auto"), nothing is constrained and no calls are parsed: the answer is plain content.
- ``"required"`` / ``{"type": "function", "function": {"name": ...}}``: decoding is constrained by a
  grammar (runtime/output/constraint.py, llguidance) to one call (several with ``parallel_tool_calls``, for
  "required") of one of the tools (of the named one), its arguments valid against that tool's
  ``parameters`` schema; so the call always parses.

    use = tool_use(tools, "required")
    use.response_format(tool_call_token_ids)   # {"type": "grammar", "grammar": LARK}, for the compiler
    parser = ToolCallParser()
    content, calls = parser.feed(text)          # per streamed delta; then parser.close()
"""
from __future__ import annotations

import dataclasses
import json
import re
import uuid

from vlm_core.errors import ParameterError
from vlm_core.runtime.output.constraint import JSON_OPTIONS

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
TOOL_CHOICES = ("auto", "none", "required")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One call the model made: `arguments` is JSON text (as OpenAI sends it)."""

    id: str
    name: str
    arguments: str

    def to_dict(self) -> dict:
        """OpenAI's tool_calls entry (also what an assistant message in the history takes)."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclasses.dataclass(frozen=True)
class ToolUse:
    """A request's checked tools and how it may use them.

    `choice` is "auto", "none", "required" or "function" (then `name` is the function it must call)."""

    tools: list
    choice: str
    name: str | None = None
    parallel: bool = True

    @property
    def parses_calls(self) -> bool:
        return self.choice != "none"

    @property
    def constrained(self) -> bool:
        return self.choice in ("required", "function")

    def response_format(self, start_token: int | None = None, end_token: int | None = None) -> dict:
        """The grammar for a "required" or named choice: ``<tool_call>\\n{"name": N, "arguments": A}\\n</tool_call>``
        with N one of the allowed names and A valid against that function's parameters (then the answer ends).

        `start_token` / `end_token`: the ids of ``<tool_call>`` / ``</tool_call>`` when the tokenizer has them
        as added tokens (llguidance matches an added token only by its id, never by its text)."""
        functions = [t["function"] for t in self.tools if self.choice == "required" or t["function"]["name"] == self.name]
        start = f"<[{start_token}]>" if start_token is not None else json.dumps(TOOL_CALL_START)
        end = f"<[{end_token}]>" if end_token is not None else json.dumps(TOOL_CALL_END)
        several = self.parallel and self.choice == "required"
        rules = ["start: call" + (' ("\\n" call)*' if several else ""),
                 f'call: {start} "\\n" body "\\n" {end}',
                 "body: " + " | ".join(f"body_{i}" for i in range(len(functions)))]
        for i, function in enumerate(functions):
            parameters = function.get("parameters") or {"type": "object", "properties": {}}
            if parameters == {"type": "object", "properties": {}}:
                parameters = {**parameters, "additionalProperties": False}  # no parameters: "{}"
            options = parameters.get("x-guidance")
            schema = {**parameters, "x-guidance": {**(options if isinstance(options, dict) else {}), **JSON_OPTIONS}}
            head = json.dumps('{"name": ' + json.dumps(function["name"]) + ', "arguments": ')
            rules.append(f'body_{i}: {head} arguments_{i} "}}"')
            rules.append(f"arguments_{i}: %json {json.dumps(schema)}")
        return {"type": "grammar", "grammar": "\n".join(rules)}


def check_tools(tools, param: str = "tools") -> list:
    """OpenAI function tools -> the same list, checked; None or [] -> [].

    Each is ``{"type": "function", "function": {"name", "description"?, "parameters"?, "strict"?}}`` with a
    name of 1-64 letters, digits, '_' or '-', unique; parameters a JSON schema (an object).
    Raises ParameterError naming `param` and the entry at fault."""
    if tools is None:
        return []
    if not isinstance(tools, (list, tuple)):
        raise ParameterError(f"{param} must be a list of function tools like {{\"type\": \"function\", "
                                    f"\"function\": {{\"name\": ..., \"parameters\": {{...}}}}}}, got "
                                    f"{json.dumps(tools, default=repr)[:80]}", param)
    names = set()
    for i, tool in enumerate(tools):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ParameterError(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                                        f"\"parameters\": {{...}}}}}} (only function tools are supported), got "
                                        f"{json.dumps(tool, default=repr)[:80]}", param)
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise ParameterError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got "
                                        f"{json.dumps(name, default=repr)[:80]}", param)
        if name in names:
            raise ParameterError(f"{where}.function.name {name!r} is given twice; tool names must be unique", param)
        names.add(name)
        if "description" in function and not isinstance(function["description"], str):
            raise ParameterError(f"{where}.function.description must be a string", param)
        if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
            raise ParameterError(f"{where}.function.parameters must be a JSON schema (an object), got "
                                        f"{json.dumps(function['parameters'], default=repr)[:80]}", param)
    return list(tools)


def tool_use(tools, tool_choice=None, parallel_tool_calls: bool = True) -> ToolUse | None:
    """Check `tools` and `tool_choice` together -> ToolUse, or None when there are no tools.

    Raises ParameterError naming ``tools`` or ``tool_choice``: a choice other than "none" without tools, an
    unknown choice, or a named function that is not among the tools."""
    tools = check_tools(tools)
    if not isinstance(parallel_tool_calls, bool):
        raise ParameterError(f"parallel_tool_calls must be true or false, got "
                                                    f"{parallel_tool_calls!r:.40}", "parallel_tool_calls")
    if not tools:
        if tool_choice is not None and tool_choice != "none":
            raise ParameterError(f"tool_choice {json.dumps(tool_choice, default=repr)[:80]} needs "
                                                f"tools; give the functions in 'tools'", "tool_choice")
        return None
    if tool_choice is None:
        return ToolUse(tools, "auto", parallel=parallel_tool_calls)
    if isinstance(tool_choice, str):
        if tool_choice not in TOOL_CHOICES:
            raise ParameterError(f"tool_choice must be 'auto', 'none', 'required' or "
                                                f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got "
                                                f"{tool_choice!r:.40}", "tool_choice")
        return ToolUse(tools, tool_choice, parallel=parallel_tool_calls)
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not (isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and isinstance(name, str)):
        raise ParameterError(f"tool_choice must be 'auto', 'none', 'required' or {{\"type\": "
                                            f"\"function\", \"function\": {{\"name\": ...}}}}, got "
                                            f"{json.dumps(tool_choice, default=repr)[:80]}", "tool_choice")
    known = [t["function"]["name"] for t in tools]
    if name not in known:
        raise ParameterError(f"tool_choice names the function {json.dumps(name)[:70]}, which is not "
                                            f"among the tools ({', '.join(known)})", "tool_choice")
    return ToolUse(tools, "function", name, parallel=parallel_tool_calls)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ToolCallParser:
    """Splits an answer's text, as it streams, into content and tool calls.

    A ``<tool_call>...</tool_call>`` block whose body is a JSON object with a string "name" (and an
    object "arguments") becomes a ToolCall; one that does not parse stays in the content as written.
    Whitespace between the content and a block (the template's "\\n" separators) is dropped. While
    streaming, text that may be the start of a block, and trailing whitespace, are held back until the
    next text decides them; `close` flushes what is left (an unclosed block is content).

    Args:
        make_id: the id of each call (default: "call_" and 24 random hex digits).
    """

    def __init__(self, make_id=new_call_id):
        self.make_id = make_id
        self.buffer = ""  # text not yet decided
        self.inside = False  # in a block (after its <tool_call>)
        self.held_space = ""  # trailing whitespace of the content, not yet sent
        self.after_block = False  # drop the whitespace that follows a block
        self.calls_made = 0

    def feed(self, text: str) -> tuple[str, list]:
        """A text delta -> (content to send now, [ToolCall] completed by it)."""
        self.buffer += text
        content, calls = [], []
        while True:
            if not self.inside:
                start = self.buffer.find(TOOL_CALL_START)
                if start < 0:
                    keep = _partial_prefix(self.buffer, TOOL_CALL_START)
                    content.append(self._content(self.buffer[:len(self.buffer) - keep]))
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    return "".join(content), calls
                content.append(self._content(self.buffer[:start]))
                self.buffer, self.inside = self.buffer[start + len(TOOL_CALL_START):], True
                continue
            end = self.buffer.find(TOOL_CALL_END)
            if end < 0:
                return "".join(content), calls
            body, self.buffer, self.inside = self.buffer[:end], self.buffer[end + len(TOOL_CALL_END):], False
            call = self._call(body)
            if call is None:  # not a call: the block is content, as written
                content.append(self._content(TOOL_CALL_START + body + TOOL_CALL_END, keep_space=True))
            else:
                calls.append(call)
                self.held_space, self.after_block = "", True
                self.calls_made += 1

    def close(self) -> tuple[str, list]:
        """The end of the answer -> (the content held back, []): an unclosed block or a partial
        ``<tool_call`` is content; trailing whitespace is sent unless it follows a call."""
        rest = (TOOL_CALL_START if self.inside else "") + self.buffer
        self.buffer, self.inside = "", False
        content = self._content(rest, keep_space=bool(rest))
        if not self.after_block:
            content += self.held_space
        self.held_space = ""
        return content, []

    def chunks(self, chunks):
        """GenerationChunks -> the same with `text` the content and `tool_calls` set; the last chunk's
        finish_reason becomes "tool_calls" when the answer ended ("stop") having made calls."""
        for chunk in chunks:
            content, calls = self.feed(chunk.text)
            finish = chunk.finish_reason
            if finish is not None:
                content += self.close()[0]
                if finish == "stop" and self.calls_made:
                    finish = "tool_calls"
            yield dataclasses.replace(chunk, text=content, tool_calls=calls or None, finish_reason=finish)

    def _content(self, text: str, keep_space: bool = False) -> str:
        """Content text to send, holding back its trailing whitespace (it may precede a block)."""
        if self.after_block:
            text = text.lstrip()
            if not text:
                return ""
            self.after_block = False
        text = self.held_space + text
        body = text if keep_space else text.rstrip()
        self.held_space = text[len(body):]
        return body

    def _call(self, body: str) -> ToolCall | None:
        try:
            value = json.loads(body)
        except ValueError:
            return None
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return None
        arguments = value.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        return ToolCall(self.make_id(), value["name"], json.dumps(arguments, ensure_ascii=False))


def _partial_prefix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a proper beginning of `marker`."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0
