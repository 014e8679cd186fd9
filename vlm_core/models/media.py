"""What a family's preprocessing hands to its prompt and vision code: images and video clips in order.

Torch-free, family-neutral data types. `runtime.chat.normalize_messages` turns a video content part into
a `VideoPart`; a family that reads video (Qwen3-VL) turns each source into pixels and a grid
(`MediaInputs`), and a family that does not refuses the part with `UnsupportedMedia`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlm_core.errors import ParameterError


@dataclass(frozen=True)
class VideoPart:
    """A video source from a message, told apart from image sources: a path, data: URL, bytes, a frame
    list or a uint8 [T, H, W, 3] array (kernels/video.py reads them)."""

    source: Any


# The most frames per second a clip may be sampled at: past any common source's frame rate (a higher fps
# samples every frame, as this does), so a larger value is a typo, not a budget.
MAX_FPS = 120


@dataclass(frozen=True)
class VideoOptions:
    """Per-request video budget: frames sampled per second, at most this many frames, at most this many
    pixels over all of a clip's frames (None: the model's video_preprocessor_config.json)."""

    fps: float | None = None
    max_frames: int | None = None
    max_pixels: int | None = None

    def check(self, names: dict | None = None) -> None:
        """Raise ValueError naming the parameter (`names` maps fps/max_frames/max_pixels to the caller's
        spelling, e.g. the CLI's flags) for a value that is not a positive number, or an fps over MAX_FPS."""
        names = {"fps": "video_fps", "max_frames": "video_max_frames", "max_pixels": "video_max_pixels",
                 **(names or {})}
        for key, integral in (("fps", False), ("max_frames", True), ("max_pixels", True)):
            value = getattr(self, key)
            if value is None:
                continue
            bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
            if integral and not bad and int(value) != value:
                bad = True
            if bad or value != value or value == float("inf"):
                kind = "a positive whole number" if integral else "a positive number"
                raise ValueError(f"{names[key]} must be {kind}, got {value!r}")
            if key == "fps" and value > MAX_FPS:
                raise ValueError(f"{names[key]} must be at most {MAX_FPS} (frames sampled per second of video), "
                                 f"got {value!r}")


class UnsupportedMedia(ParameterError):
    """The model's family cannot read this kind of input (e.g. video for MiniGPT-4)."""


@dataclass
class MediaInputs:
    """A prompt's images and clips, preprocessed, one row of `grid_thw` per item in prompt order.

    pixel_values: the items' pixels concatenated (the family's layout); grid_thw: int64 [n_items, ...]
    (the family's per-item shape: (t, h, w) patches for Qwen3-VL, a clip's t counting its frame groups);
    kinds: "image" or "video" per item; timestamps: per item, the seconds of each frame group (videos) or
    None (images)."""

    pixel_values: np.ndarray
    grid_thw: np.ndarray
    kinds: tuple = ()
    timestamps: list = field(default_factory=list)

    def of_kind(self, kind: str) -> np.ndarray | None:
        """The grid rows of one kind, in order, or None when there is none."""
        rows = [i for i, k in enumerate(self.kinds) if k == kind]
        return np.asarray(self.grid_thw)[rows] if rows else None
