"""Grounding: the boxes and points Qwen3-VL writes in an answer, in pixels of the image as the user sees it.

Asked to locate, detect or point at things, Qwen3-VL answers with JSON (often in a ```json fence)::

    [{"bbox_2d": [x1, y1, x2, y2], "label": "cup"}, {"point_2d": [x, y], "label": "handle"}]

**Coordinates are relative to the image, 0..1000 on each axis** (x from the left edge, y from the top edge),
whatever size the processor resized the image to. Sources (read for this module, not remembered):

* QwenLM/Qwen3-VL, ``cookbooks/2d_grounding.ipynb``, first cell: "Qwen3-VL's default coordinate system has been
  changed from the absolute coordinates used in Qwen2.5-VL to relative coordinates ranging from 0 to 1000. (You
  don't need to calculate the resized_w)". Its ``plot_bounding_boxes`` maps ``bbox_2d[0] / 1000 * width`` and
  ``bbox_2d[1] / 1000 * height`` onto the image as opened (``img.size``, e.g. 640x479 for its first example, whose
  answer holds values up to 999), ``plot_points`` does the same for ``point_2d``, and it swaps x1/x2 (y1/y2) when
  they come reversed.
* QwenLM/Qwen3-VL, ``qwen-vl-finetune/tools/process_bbox.ipynb``: training targets are made from pixels of the
  *original* image as ``round(x1 / w * 1000)``, clipped to [0, 1000]; Qwen2.5-VL's were pixels of the
  smart-resized image (``convert_to_qwen25vl_format``), which is the convention this one replaced.
* transformers 5.24 ``models/qwen3_vl`` (processor and model) has no box post-processing: the answer is plain
  text, so the convention lives only in the model's training, as documented above.

Alibaba Cloud's model-studio pages describe the range as 0..999 (QwenLM/Qwen3-VL issue #1741 asks which is right);
we divide by 1000 as the model's own cookbook does (the two readings differ by 0.1% of the image at most).

Hence ``pixel = value / 1000 * size``, where the size is that of the image the model was given: a file, bytes or a
data: URL after ``ImageOps.exif_transpose`` (how kernels/image.py and transformers load them, and how viewers show
them); a PIL image as it is. Resizing for the token budget (min/max pixels) leaves relative values unchanged.

Parsing rules (runtime/server/static/grounding.js follows the same ones; tests/grounding_cases.json holds both to them):
every complete JSON value that opens with ``[`` or ``{`` is read, wherever it stands (prose, fences and truncated
outer brackets around it do not matter), and every object in it with a valid ``bbox_2d`` (4 finite numbers) or
``point_2d`` (2 numbers) is an item. An answer cut off mid-list still gives its complete objects. Pure Python and
Pillow; no torch.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
from dataclasses import dataclass, field

from PIL import ExifTags, Image, ImageDraw, ImageFont

from vlm_core.kernels.image import ImageError, describe_source

GROUNDING_SCALE = 1000  # Qwen3-VL's relative coordinate range (see the module docstring)
_OPENERS = re.compile(r"[\[{]")
_DECODER = json.JSONDecoder()
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that exif_transpose turns by 90 degrees (width and height swap)
_PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324",
            "#808000", "#000075")  # one colour per label, in order of appearance (grounding.js uses the same)


@dataclass
class GroundingItem:
    """One object of the answer, in the model's own relative coordinates (0..scale)."""

    label: str
    bbox_2d: list | None = None  # [x1, y1, x2, y2] as written
    point_2d: list | None = None  # [x, y] as written
    attributes: dict = field(default_factory=dict)  # the object's other keys (e.g. "color")


def json_values(text: str):
    """Yield every complete JSON object or array in `text`, left to right (they do not overlap).

    Where a value cannot be read (cut off, or not JSON), the scan moves one character on, so the complete
    values inside a truncated one are still found."""
    position = 0
    while (match := _OPENERS.search(text, position)) is not None:
        try:
            value, position = _DECODER.raw_decode(text, match.start())
        except (ValueError, RecursionError):
            position = match.start() + 1
            continue
        yield value


def _numbers(value, count: int) -> list | None:
    """`value` when it is a list of `count` finite numbers (booleans are not numbers), else None."""
    if not isinstance(value, list) or len(value) != count:
        return None
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return value
    return None


def _collect(value, items: list) -> None:
    if isinstance(value, dict):
        if "bbox_2d" in value or "point_2d" in value:
            bbox, point = _numbers(value.get("bbox_2d"), 4), _numbers(value.get("point_2d"), 2)
            if bbox is not None or point is not None:
                label = value.get("label")
                attributes = {k: v for k, v in value.items() if k not in ("bbox_2d", "point_2d", "label")}
                items.append(GroundingItem(label if isinstance(label, str) else "", bbox, point, attributes))
            return
        for child in value.values():
            _collect(child, items)
    elif isinstance(value, list):
        for child in value:
            _collect(child, items)


def parse_grounding(text: str) -> list[GroundingItem]:
    """The boxes and points in an answer, in the order written (see the module docstring for the rules)."""
    items: list[GroundingItem] = []
    for value in json_values(text):
        _collect(value, items)
    return items


def _to_pixel(value: float, size: int, scale: float) -> float:
    return round(min(max(value, 0), scale) / scale * size, 2)


def to_pixels(items: list[GroundingItem], width: int, height: int, scale: float = GROUNDING_SCALE,
              image: int = 0) -> list[dict]:
    """Items in relative coordinates -> dicts in pixels of a `width` x `height` image, clipped to it.

    Returns, per item: ``label``; ``image`` (the index given); ``bbox`` ``[x1, y1, x2, y2]`` with x1 <= x2 and
    y1 <= y2, and ``point`` ``[x, y]`` (pixels, floats rounded to 0.01; None when the item has none); the model's
    ``bbox_2d`` / ``point_2d`` as written; and ``attributes``, the object's other keys."""
    boxes = []
    for item in items:
        bbox = point = None
        if item.bbox_2d is not None:
            x1, y1, x2, y2 = item.bbox_2d
            xs = sorted(_to_pixel(x, width, scale) for x in (x1, x2))
            ys = sorted(_to_pixel(y, height, scale) for y in (y1, y2))
            bbox = [xs[0], ys[0], xs[1], ys[1]]
        if item.point_2d is not None:
            point = [_to_pixel(item.point_2d[0], width, scale), _to_pixel(item.point_2d[1], height, scale)]
        boxes.append({"label": item.label, "image": image, "bbox": bbox, "point": point,
                      "bbox_2d": item.bbox_2d, "point_2d": item.point_2d, "attributes": item.attributes})
    return boxes


def grounding_boxes(text: str, width: int, height: int, scale: float = GROUNDING_SCALE, image: int = 0) -> list:
    """`parse_grounding` then `to_pixels`: an answer's boxes and points in pixels of a `width` x `height` image."""
    return to_pixels(parse_grounding(text), width, height, scale, image)


def image_size_as_seen(src) -> tuple[int, int]:
    """(width, height) of an image source as the model received it, read from the header only.

    Files, bytes and data: URLs: after EXIF orientation (a 90-degree orientation swaps the stored width and
    height, as ``ImageOps.exif_transpose`` does); a PIL image: its size as given (transformers does not rotate
    those). Raises ImageError when the source cannot be read."""
    if isinstance(src, Image.Image):
        return src.size
    from vlm_core.kernels.image_url import resolve_image_url

    name = describe_source(src)
    data = resolve_image_url(src) if isinstance(src, str) else src
    try:
        opened = Image.open(io.BytesIO(bytes(data)) if isinstance(data, (bytes, bytearray)) else os.fspath(data))
        with opened:
            width, height = opened.size
            orientation = opened.getexif().get(ExifTags.Base.Orientation, 1)
    except (OSError, ValueError, SyntaxError, EOFError, TypeError) as e:
        raise ImageError(f"{name}: cannot read the image's size ({e})") from None
    return (height, width) if orientation in _ROTATED else (width, height)


def label_colors(boxes: list[dict]) -> dict:
    """label -> colour: the palette in order of first appearance, so equal labels share a colour."""
    colors: dict = {}
    for box in boxes:
        colors.setdefault(box["label"], _PALETTE[len(colors) % len(_PALETTE)])
    return colors


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def draw_grounding(image: Image.Image, boxes: list[dict]) -> Image.Image:
    """An RGB copy of `image` with the boxes (outlined) and points (dots) of `to_pixels`, each with its label.

    Lines and text scale with the image (2 px lines and 12 px text at least)."""
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    side = min(canvas.size)
    line, font = max(2, round(side / 250)), _font(max(12, round(side / 40)))
    colors = label_colors(boxes)
    for box in boxes:
        color = colors[box["label"]]
        anchor = None
        if box["bbox"] is not None:
            x1, y1, x2, y2 = box["bbox"]
            draw.rectangle((x1, y1, x2, y2), outline=color, width=line)
            anchor = (x1, y1)
        if box["point"] is not None:
            x, y = box["point"]
            radius = 2 * line + 1
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=color, outline="white", width=1)
            anchor = anchor or (x + radius, y - radius)
        if box["label"] and anchor is not None:
            _draw_label(draw, box["label"], anchor, color, font, canvas.size)
    return canvas


def _draw_label(draw: ImageDraw.ImageDraw, label: str, anchor: tuple, color: str, font, size: tuple) -> None:
    """White text on a `color` tab just above `anchor` (inside the image when there is no room above)."""
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    width, height = right - left + 6, bottom - top + 4
    x = min(max(anchor[0], 0), max(size[0] - width, 0))
    y = anchor[1] - height if anchor[1] - height >= 0 else anchor[1]
    draw.rectangle((x, y, x + width, y + height), fill=color)
    draw.text((x + 3 - left, y + 2 - top), label, fill="white", font=font)
