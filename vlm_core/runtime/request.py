"""How to answer a prompt, validated once: the one generation-options record of the API, the CLI, the server and
chat sessions.

Each front end turns its own input into a GenerationOptions exactly once, through `check_options`, with the
parameter names its user wrote (`API_NAMES`; the server's JSON fields; the CLI's flags), so every error names
what the caller typed. The grammar of a response format or a tool choice is compiled once, by
`compile_grammar` (it needs the model's tokenizer). The facade and the engine take the record as it is and
check nothing in it again.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vlm_core.errors import ParameterError
from vlm_core.kernels.sampling import SamplingParams
from vlm_core.models.media import VideoOptions
from vlm_core.runtime.chat.tools import (
    TOOL_CALL_END,
    TOOL_CALL_START,
    ToolUse,
    tool_use,
)
from vlm_core.runtime.checks import (
    check_logprobs,
    check_stop_strings,
    check_token_limits,
)

# The SamplingParams fields a generation_config.json or a caller may set (besides greedy and seed).
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def sampling_over_defaults(explicit: dict, defaults: dict, greedy: bool = False, seed: int | None = None) -> SamplingParams:
    """The caller's sampling values (`explicit`) over the model's generation_config `defaults`, as transformers
    merges them: it samples only when the config does (do_sample) or the caller gives a sampling value; `greedy`
    wins, and temperature 0 is greedy. Raises SamplingParamError naming the SamplingParams field out of range.
    The one merge of the CLI's flags and the server's request fields."""
    wants_sampling = defaults.get("do_sample", False) or any(k in explicit for k in ("temperature", "top_k",
                                                                                     "top_p", "min_p"))
    values = {k: defaults[k] for k in SAMPLING_FIELDS if k in defaults}
    values.update({k: explicit[k] for k in SAMPLING_FIELDS if k in explicit})
    greedy = greedy or not wants_sampling or values.get("temperature", 1.0) == 0
    return SamplingParams(greedy=greedy, seed=seed, **values)  # checked when made


# Parameter -> the name the Python API's callers write (the defaults of `check_options`' `names`).
API_NAMES = {"max_new_tokens": "max_new_tokens", "min_new_tokens": "min_new_tokens", "stop": "stop",
             "logprobs": "logprobs", "response_format": "response_format", "tools": "tools", "video": "video",
             "sampling": "sampling", "batch_invariant": "batch_invariant", "jump_forward": "jump_forward"}


@dataclass(frozen=True)
class GenerationOptions:
    """A request's generation options, checked (make it with `check_options`, then `compile_grammar`).

    sampling: validated SamplingParams. max_new_tokens: the answer's length limit; None only in the server
    before the prompt is known (it then picks one within the context). min_new_tokens: EOS suppressed until
    then. stop: stop texts (the family's own are added by the engine's caller). logprobs: top alternatives to
    report per token (0-20), None for none. response_format: as the caller gave it (None: free text).
    tool_use: the checked tools and tool choice, None without tools. video: the clips' budget, None for the
    model's defaults. batch_invariant: the tokens must not depend on what is decoded beside them; None: the
    model's default. jump_forward: the tokens a grammar forces go through the decoder as one chunk
    (engine/jump_forward.py); None: the model's default. grammar: the compiled constraint (response format or
    forced tool call), None: none.
    """

    sampling: SamplingParams
    max_new_tokens: int | None = 256
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    response_format: Any = None
    tool_use: ToolUse | None = None
    video: VideoOptions | None = None
    batch_invariant: bool | None = None
    jump_forward: bool | None = None
    grammar: Any = None

    @property
    def tools(self) -> list | None:
        """The function tools the chat template renders, or None."""
        return self.tool_use.tools if self.tool_use is not None else None


def video_options(video, name: str = "video") -> VideoOptions | None:
    """VideoOptions from None, a VideoOptions or a dict of its fields, checked; ParameterError naming `name`."""
    if video is None:
        return None
    if isinstance(video, dict):
        unknown = set(video) - {"fps", "max_frames", "max_pixels"}
        if unknown:
            raise ParameterError(f"{name} has unknown keys {sorted(unknown)}; use fps, max_frames, max_pixels", name)
        video = VideoOptions(**video)
    if not isinstance(video, VideoOptions):
        raise ParameterError(f"{name} must be a dict or VideoOptions, got {type(video).__name__}", name)
    try:
        video.check()
    except ValueError as e:
        raise ParameterError(str(e), name) from None
    return video


def check_options(sampling: SamplingParams | None = None, max_new_tokens: int | None = 256,
                  min_new_tokens: int = 0, stop=None, logprobs: int | None = None, response_format=None,
                  tools=None, tool_choice=None, parallel_tool_calls: bool = True, video=None,
                  batch_invariant: bool | None = None, names: dict | None = None,
                  jump_forward: bool | None = None) -> GenerationOptions:
    """Every generation argument checked once -> GenerationOptions (grammar not compiled yet).

    `names` maps the parameters to what the caller wrote (API_NAMES by default). `max_new_tokens=None` is
    allowed (the server's "pick one within the context"). Raises ParameterError naming the parameter."""
    names = {**API_NAMES, **(names or {})}
    if max_new_tokens is not None:
        check_token_limits(max_new_tokens, min_new_tokens, names["max_new_tokens"], names["min_new_tokens"])
    elif not (isinstance(min_new_tokens, int) and not isinstance(min_new_tokens, bool) and min_new_tokens >= 0):
        raise ParameterError(f"{names['min_new_tokens']} must be an integer >= 0, got {min_new_tokens!r:.40}",
                             names["min_new_tokens"])
    check_logprobs(logprobs, names["logprobs"])
    if sampling is None:
        sampling = SamplingParams(greedy=True)
    if not isinstance(sampling, SamplingParams):
        raise ParameterError(f"{names['sampling']} must be a SamplingParams, got {type(sampling).__name__}",
                             names["sampling"])
    for name, flag in (("batch_invariant", batch_invariant), ("jump_forward", jump_forward)):
        if flag is not None and not isinstance(flag, bool):
            raise ParameterError(f"{names[name]} must be true or false, got {flag!r:.40}", names[name])
    use = tool_use(tools, tool_choice, parallel_tool_calls)
    if use is not None and use.constrained and response_format not in (None, {"type": "text"}):
        raise ParameterError(f"{names['response_format']} cannot be combined with tool_choice {use.choice!r}, "
                             f"which constrains the answer to a tool call", names["response_format"])
    return GenerationOptions(sampling=sampling.validate(), max_new_tokens=max_new_tokens,
                             min_new_tokens=int(min_new_tokens), stop=tuple(check_stop_strings(stop, names["stop"])),
                             logprobs=logprobs, response_format=response_format, tool_use=use,
                             video=video_options(video, names["video"]), batch_invariant=batch_invariant,
                             jump_forward=jump_forward)


def compile_grammar(options: GenerationOptions, grammars, tokenizer, names: dict | None = None) -> GenerationOptions:
    """`options` with its grammar compiled (a response format, or the tool call a tool choice forces), cached by
    `grammars` (the model's GrammarCompiler). Raises ParameterError naming response_format or tools."""
    names = {**API_NAMES, **(names or {})}
    grammar = grammars.compile(options.response_format, names["response_format"])
    use = options.tool_use
    if use is not None and use.constrained:
        grammar = grammars.compile(use.response_format(tokenizer.token_to_id(TOOL_CALL_START),
                                                       tokenizer.token_to_id(TOOL_CALL_END)), names["tools"])
    return dataclasses.replace(options, grammar=grammar)
