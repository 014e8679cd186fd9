"""Which image an answer's boxes refer to, and the answer's boxes in that image's pixels.

`GenerationResult.boxes` (runtime/model.py) and the CLI's `--json` / `--draw-boxes` (runtime/generate.py) use
these; the parsing and the 0..1000 convention are in kernels/grounding.py. A family that writes boxes says so
with a `grounding_scale` attribute (Qwen3-VL: 1000); MiniGPT-4 has none, so its answers give no boxes.

Qwen3-VL's JSON does not name an image, so the boxes are placed on **the first image of the last user message
that holds images**: the image just sent (the CLI's first `--image`, the chat page's latest picture), and in a
chat whose last question brings no image, the latest picture before it.
"""
from __future__ import annotations

from typing import NamedTuple

from vlm_core.kernels.grounding import grounding_boxes, image_size_as_seen


class GroundingImage(NamedTuple):
    """The image an answer's boxes refer to: its index among the prompt's images, and its size as seen."""

    index: int
    width: int
    height: int


def grounded_image_index(template_messages: list) -> int | None:
    """Index (among all the conversation's images, in order) of the first image of the last user message
    holding images; None when no user message holds one. `template_messages` are normalised
    (chat/messages.py's `normalize_messages`), as the facade has them once it has prepared a prompt."""
    index, chosen = 0, None
    for message in template_messages:
        parts = message.get("content")
        count = sum(1 for part in parts if part.get("type") == "image") if isinstance(parts, list) else 0
        if count and message.get("role") == "user":
            chosen = index
        index += count
    return chosen


def grounding_image(template_messages: list, images: list) -> GroundingImage | None:
    """The GroundingImage of a conversation whose image sources (in order) are `images`; None without images.

    Reads one image header (the images were just decoded for the model, so this cannot fail where they did not)."""
    if not images:
        return None
    index = grounded_image_index(template_messages)
    if index is None:
        return None
    width, height = image_size_as_seen(images[index])
    return GroundingImage(index, width, height)


def answer_boxes(text: str, image: GroundingImage | None, scale: float | None) -> list[dict]:
    """The boxes and points of an answer in pixels of `image` (kernels.grounding.to_pixels' dicts); [] when the
    prompt had no image or the family writes no boxes (`scale` None)."""
    if image is None or not scale:
        return []
    return grounding_boxes(text, image.width, image.height, scale, image.index)
