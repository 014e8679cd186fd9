"""A conversation with a model: history kept here, KV of earlier turns kept by the engine's prefix cache.

    chat = vlm.chat(system="Answer briefly.", max_new_tokens=64)
    chat.ask("What is in this photo?", images=["cat.jpg"])
    chat.ask("What colour is it?")          # the photo and the first turn are not computed again

With `tools=[...]` (and `tool_choice`) among the defaults, an answer's calls join the history as the
assistant message's `tool_calls`; send each result back with
``chat.send({"role": "tool", "tool_call_id": call.id, "content": "..."})``.
"""
from __future__ import annotations

from vlm_core.runtime.chat.messages import build_user_messages


class ChatSession:
    """History of one conversation; `ask` adds a user turn, answers it and adds the answer.

    Args:
        model: a VisionLanguageModel.
        system: an optional system message.
        generation: defaults for every turn (sampling, max_new_tokens, min_new_tokens, stop, response_format,
            logprobs, tools, tool_choice).
    """

    def __init__(self, model, system: str | None = None, **generation):
        self.model = model
        self.messages: list = [{"role": "system", "content": system}] if system else []
        self.generation = generation
        self.last_result = None

    def ask(self, text: str, images=(), **generation) -> str:
        """One user turn (images then text) -> the answer text; the GenerationResult is `last_result`."""
        return self.send(build_user_messages(text, list(images))[0], **generation).text

    def send(self, message: dict, **generation):
        """Add one user (or tool) message (transformers' chat format), answer it; returns the GenerationResult.

        A turn that fails leaves the history as it was."""
        messages = self.messages + [message]
        result = self.model.generate(messages, **{**self.generation, **generation})
        self.messages = messages + [_assistant(result.text, result.tool_calls)]
        self.last_result = result
        return result

    def stream(self, text: str, images=(), **generation):
        """Like `ask`, yielding GenerationChunks; the answer joins the history when the stream ends."""
        message = build_user_messages(text, list(images))[0]
        messages = self.messages + [message]
        pieces, calls = [], []
        for chunk in self.model.stream_generate(messages, **{**self.generation, **generation}):
            pieces.append(chunk.text)
            calls += chunk.tool_calls or []
            yield chunk
        self.messages = messages + [_assistant("".join(pieces), calls)]


def _assistant(text: str, tool_calls: list) -> dict:
    """The assistant message for the history: its text and, when it made any, its calls (OpenAI's shape)."""
    message = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = [call.to_dict() for call in tool_calls]
    return message
