"""Checks on what a caller passes in, each error naming the value the way the caller wrote it.

The Python API passes its parameter names (``max_new_tokens``, ``messages``), the CLI its flags
(``--max-new-tokens``, ``-p/--prompt``), so one check gives every caller a message in its own terms.
All raise `ParameterError` (a UserError and a ValueError) with ``param`` set to that name.
"""
from __future__ import annotations

import numpy as np

from vlm_core.errors import ParameterError


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def first_lone_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate (U+D800..U+DFFF) in `text`, or None when it is valid Unicode.

    A Python str can hold them (on Linux, command-line bytes that are not UTF-8 arrive as U+DC80..U+DCFF
    through surrogateescape), but they are not text: the tokenizer refuses them with a TypeError.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def check_text(text: str, name: str, param: str | None = None) -> None:
    """Refuse text holding a lone surrogate, naming `name`, the position and, for U+DC80..U+DCFF, the
    byte it stands for (what surrogateescape made of a byte that is not UTF-8).

    `param` is the parameter the error is about when `name` is a place inside it (``messages`` for
    ``messages[0].content[1].text``); by default `name` itself."""
    index = first_lone_surrogate(text)
    if index is None:
        return
    code = ord(text[index])
    byte = f" (the byte 0x{code - 0xDC00:02x}, which is not UTF-8)" if 0xDC80 <= code <= 0xDCFF else ""
    raise ParameterError(f"{name} is not valid text: a lone surrogate U+{code:04X} at character "
                                        f"{index}{byte}; give UTF-8 text", param or name)


def check_token_limits(max_new_tokens, min_new_tokens, max_name: str = "max_new_tokens",
                       min_name: str = "min_new_tokens") -> None:
    """Refuse a `max_new_tokens` below 1 or a `min_new_tokens` outside [0, max_new_tokens] (integers only)."""
    if not (_is_int(max_new_tokens) and max_new_tokens >= 1):
        raise ParameterError(f"{max_name} must be an integer >= 1, got {max_new_tokens!r}", max_name)
    if not (_is_int(min_new_tokens) and 0 <= min_new_tokens <= max_new_tokens):
        raise ParameterError(f"{min_name} must be an integer between 0 and {max_name} "
                                       f"({max_new_tokens}), got {min_new_tokens!r}", min_name)


def check_stop_strings(stop, name: str = "stop") -> list[str]:
    """`stop` (None, one string, or a list/tuple of strings) -> a list of non-empty strings.

    One string is one stop text (not a list of characters); an empty one is refused, since it would
    match before any text, and so is one that is not valid text (a lone surrogate: on the command line,
    a byte that is not UTF-8), since the answer's text could never hold it."""
    if stop is None:
        return []
    texts = [stop] if isinstance(stop, str) else stop
    if not isinstance(texts, (list, tuple)) or not all(isinstance(text, str) for text in texts):
        raise ParameterError(f"{name} must be a string or a list of strings, got {stop!r:.80}", name)
    if any(text == "" for text in texts):
        raise ParameterError(f"{name} must be non-empty text (an empty stop text matches at once), got ''", name)
    for text in texts:
        check_text(text, name)
    return list(texts)


def check_logprobs(logprobs, name: str = "logprobs") -> None:
    """Refuse a `logprobs` count other than None (off) or an integer in [0, 20] (OpenAI's top_logprobs range)."""
    if logprobs is not None and not (_is_int(logprobs) and 0 <= logprobs <= 20):
        raise ParameterError(f"{name} must be an integer from 0 to 20 (how many of the most likely tokens "
                                   f"to report beside each chosen one), got {logprobs!r}", name)
