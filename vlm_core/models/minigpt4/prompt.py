"""MiniGPT-4 prompt layout: conversation templates and the split-at-<ImageHere> tokenization.

Mirrors Vision-CAIR/MiniGPT-4 (minigpt4/conversation/conversation.py and the model's
`get_context_emb`):

* `Conversation.get_prompt()` with SeparatorStyle.SINGLE renders ``system + sep`` then, per
  message, ``role + message + sep`` (``role`` alone for the open assistant turn);
* `Chat.upload_img` adds the user message ``<Img><ImageHere></Img>`` and `Chat.ask` appends the
  question after a space: ``<Img><ImageHere></Img> {question}``;
* `get_context_emb` splits the prompt at ``<ImageHere>``, tokenizes each segment on its own with
  ``add_special_tokens=(i == 0)`` (so the BOS comes only before the first segment) and places
  each image's query embeddings between the segments.

Templates (CONV_VISION_Vicuna0, CONV_VISION_LLama2):

    vicuna_v0: "{system}###Human: <Img><ImageHere></Img> {question}###Assistant: "   stop at "###"
    llama2:    "{system}<s>[INST] <Img><ImageHere></Img> {question} [/INST] "        stop at EOS

Serve-time module: numpy + tokenizers only.
"""
from __future__ import annotations

import numpy as np

IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_MESSAGE = "<Img><ImageHere></Img>"
DEFAULT_SYSTEM = ("Give the following image: <Img>ImageContent</Img>. "
                  "You will be able to see the image once I provide it to you. Please answer my questions.")

# name -> (user role, assistant role, separator, stop strings)
TEMPLATES = {
    "vicuna_v0": {"roles": ("Human: ", "Assistant: "), "sep": "###", "stop": ["###"]},
    "llama2": {"roles": ("<s>[INST] ", " [/INST] "), "sep": "", "stop": []},
}


def _jinja_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def chat_template(name: str) -> str:
    """A Hugging Face style chat template (jinja) rendering `name`'s conversation as MiniGPT-4's Chat does.

    Each image of a user message is a user turn ``<Img><ImageHere></Img>`` of its own (`Chat.upload_img`),
    the message's text joins the last one after a space (`Chat.ask`); a system message replaces
    MiniGPT-4's default system text; an assistant message is ``role + answer + sep``.
    """
    if name not in TEMPLATES:
        raise ValueError(f"unknown MiniGPT-4 prompt template {name!r}; known: {', '.join(TEMPLATES)}")
    t = TEMPLATES[name]
    user, assistant = (_jinja_string(r) for r in t["roles"])
    sep, image, system = _jinja_string(t["sep"]), _jinja_string(IMAGE_MESSAGE), _jinja_string(DEFAULT_SYSTEM)
    return (
        "{%- set ns = namespace(system=" + system + ") -%}"
        "{%- for m in messages if m['role'] == 'system' -%}"
        "{%- if m['content'] is string -%}{%- set ns.system = m['content'] -%}"
        "{%- else -%}{%- set ns.system = m['content'] | selectattr('type', 'equalto', 'text') "
        "| map(attribute='text') | join(' ') -%}{%- endif -%}{%- endfor -%}"
        "{{- ns.system + " + sep + " -}}"
        "{%- for m in messages if m['role'] != 'system' -%}"
        "{%- set part = namespace(images=0, text=[]) -%}"
        "{%- if m['content'] is string -%}{%- set part.text = [m['content']] -%}"
        "{%- else -%}{%- for c in m['content'] -%}"
        "{%- if c['type'] in ('image', 'image_url') -%}{%- set part.images = part.images + 1 -%}"
        "{%- elif c['type'] == 'text' -%}{%- set part.text = part.text + [c['text']] -%}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- if m['role'] == 'user' -%}"
        "{%- for i in range(part.images - 1) -%}{{- " + user + " + " + image + " + " + sep + " -}}{%- endfor -%}"
        "{{- " + user + " + ((" + image + ") if part.images > 0 else '') "
        "+ (' ' if part.images > 0 and part.text else '') + (part.text | join(' ')) + " + sep + " -}}"
        "{%- else -%}{{- " + assistant + " + (part.text | join(' ')) + " + sep + " -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- " + assistant + " -}}{%- endif -%}"
    )


def tokenize_segments(tokenizer, text: str, n_images: int, num_query_tokens: int, placeholder_id: int) -> np.ndarray:
    """Prompt text -> int64 ids: segments split at <ImageHere>, special tokens (BOS) on the first only,
    `num_query_tokens` copies of `placeholder_id` where each image's query embeddings go.

    `tokenizer` is a ``tokenizers.Tokenizer``. Raises ValueError when the number of <ImageHere> differs
    from the number of images.
    """
    segments = text.split(IMAGE_PLACEHOLDER)
    if len(segments) - 1 != n_images:
        raise ValueError(f"the prompt holds {len(segments) - 1} {IMAGE_PLACEHOLDER} placeholder(s) but "
                         f"{n_images} image(s) were given; each image needs exactly one placeholder")
    ids: list[int] = []
    for i, segment in enumerate(segments):
        if i > 0:
            ids += [int(placeholder_id)] * int(num_query_tokens)
        ids += tokenizer.encode(segment, add_special_tokens=(i == 0)).ids
    return np.asarray(ids, dtype=np.int64)
