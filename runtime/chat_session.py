"""A conversation with a model: history kept here, KV of earlier turns kept by the engine's prefix cache.

    chat = vlm.chat(system="Answer briefly.", max_new_tokens=64)
    chat.ask("What is in this photo?", images=["cat.jpg"])
    chat.ask("What colour is it?")          # the photo and the first turn are not computed again
"""
from __future__ import annotations

from .chat import build_user_messages


class ChatSession:
    """History of one conversation; `ask` adds a user turn, answers it and adds the answer.

    Args:
        model: a VisionLanguageModel.
        system: an optional system message.
        generation: defaults for every turn (sampling, max_new_tokens, min_new_tokens, stop).
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
        """Add one user message (transformers' chat format), answer it; returns the GenerationResult.

        A turn that fails leaves the history as it was."""
        messages = self.messages + [message]
        result = self.model.generate(messages, **{**self.generation, **generation})
        self.messages = messages + [{"role": "assistant", "content": result.text}]
        self.last_result = result
        return result

    def stream(self, text: str, images=(), **generation):
        """Like `ask`, yielding GenerationChunks; the answer joins the history when the stream ends."""
        message = build_user_messages(text, list(images))[0]
        messages = self.messages + [message]
        pieces = []
        for chunk in self.model.stream_generate(messages, **{**self.generation, **generation}):
            pieces.append(chunk.text)
            yield chunk
        self.messages = messages + [{"role": "assistant", "content": "".join(pieces)}]
