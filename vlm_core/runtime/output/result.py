"""A whole answer, assembled from its streamed chunks in one place (the API, the CLI, the server, chat sessions).

    answer = ResultAccumulator()
    for chunk in sequence.chunks():
        answer.add(chunk)              # text, token ids, log-probabilities, tool calls, finish reason
    result = answer.result(prompt, timings, ...)
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationResult:
    """A whole answer with its statistics (what `--json` prints)."""

    text: str
    token_ids: list
    prompt_tokens: int
    image_tokens: int
    finish_reason: str
    timings: dict = field(default_factory=dict)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    # the answer's boxes and points in pixels of the image they refer to (output/grounding.py); [] without images
    boxes: list = field(default_factory=list)
    logprobs: list | None = None  # [TokenLogprob], one per token id, when asked for (`logprobs=N`)
    # with tools: the calls the model made ([ToolCall]); `text` is then the content outside the call blocks
    tool_calls: list = field(default_factory=list)
    # what the model did to the input that the caller should know (images scaled down to fit the context)
    warnings: list = field(default_factory=list)

    def to_dict(self) -> dict:
        result = {"text": self.text, "token_ids": self.token_ids, "prompt_tokens": self.prompt_tokens,
                  "image_tokens": self.image_tokens, "cached_tokens": self.cached_tokens,
                  "finish_reason": self.finish_reason, "boxes": self.boxes, "timings": self.timings, **self.timings}
        if self.logprobs is not None:
            result["logprobs"] = [entry.to_dict() for entry in self.logprobs]
        if self.tool_calls:
            result["tool_calls"] = [call.to_dict() for call in self.tool_calls]
        if self.warnings:
            result["warnings"] = list(self.warnings)
        return result


class ResultAccumulator:
    """The chunks of one answer, joined: text pieces, token ids, their log-probabilities (when computed), the
    tool calls completed, and the finish reason (that of the last chunk that has one; "length" until then)."""

    def __init__(self):
        self.pieces: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list = []
        self.tool_calls: list = []
        self.finish_reason = "length"

    def add(self, chunk) -> None:
        """Take one GenerationChunk."""
        self.pieces.append(chunk.text)
        self.tool_calls += chunk.tool_calls or []
        if chunk.token_id is not None:
            self.token_ids.append(chunk.token_id)
            if chunk.logprobs is not None:
                self.logprobs.append(chunk.logprobs)
        self.finish_reason = chunk.finish_reason or self.finish_reason

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def result(self, prompt, timings: dict, cached_tokens: int = 0, boxes: list = (),
               logprobs_requested: bool = False) -> GenerationResult:
        """The GenerationResult for `prompt` (the PreparedPrompt answered), with summarized `timings`."""
        return GenerationResult(self.text, list(self.token_ids), int(len(prompt.input_ids)), prompt.image_tokens,
                                self.finish_reason, timings, cached_tokens, boxes=list(boxes),
                                logprobs=list(self.logprobs) if logprobs_requested else None,
                                tool_calls=list(self.tool_calls), warnings=list(getattr(prompt, "warnings", ())))


def summarize_timings(timings: dict, load_s: float) -> dict:
    """Seconds and tokens/s as `--json` reports them."""
    steps = timings.get("decode_steps", 0)
    decode_s = timings.get("decode_s", 0.0)
    return {"load_s": round(load_s, 4), "vision_s": round(timings.get("vision_s", 0.0), 4),
            "prefill_s": round(timings.get("prefill_s", 0.0), 4), "ttft_s": round(timings.get("ttft_s", 0.0), 4),
            "decode_tokens_per_s": round(steps / decode_s, 3) if decode_s > 0 else 0.0,
            # tokens a grammar forced that went through the decoder in a jump-forward chunk, not a step of their own
            "forced_tokens": int(timings.get("forced_tokens", 0))}
