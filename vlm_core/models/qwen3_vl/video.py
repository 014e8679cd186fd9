"""Qwen3-VL video preprocessing: frame sampling, sizes, pixels and timestamps, NumPy only.

Reference: transformers 5.24's `Qwen3VLVideoProcessor` (models/qwen3_vl/video_processing_qwen3_vl.py) and
`Qwen3VLProcessor._calculate_timestamps`. Per clip:

1. sample: `sample_frame_indices` (= `Qwen3VLVideoProcessor.sample_frames`): `fps` frames per second of
   the source (24 assumed when it has no frame rate), within [min_frames, max_frames] and the frame count,
   spread evenly with `np.linspace(...).round()`.
2. size: `video_grid` (= the processor's 3-D `smart_resize`): the pixel budget `size.longest_edge` is for
   ALL frames of the clip; `cap_pixels_per_frame` applies qwen-vl-utils' per-frame cap.
3. resize: torch's uint8 antialiased bicubic (`kernels.bicubic.resize_frames`, bit-identical), which is what
   the processor's torchvision `resize(BICUBIC, antialias=True)` runs on uint8 frames.
4. rescale + normalize, fused as torchvision's processor does (`_fuse_mean_std_and_rescale_factor`):
   (x - 255 * mean) / (255 * std) in float32.
5. patchify: frames padded to a multiple of temporal_patch_size by repeating the last one, then cut into
   (C, T, P, P) patches in spatial-merge-block order (the processor's `patchify`).

Timestamps (`frame_timestamps`) are the mean time of the first and last frame of each temporal patch.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from vlm_core.kernels.bicubic import resize_frames
from vlm_core.kernels.video import VideoError, VideoInfo
from vlm_core.models.config import check_field_types
from vlm_core.models.qwen3_vl.preprocess import PixelSteps, channel_list

IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
UNKNOWN_FPS = 24  # what transformers assumes for a source without a frame rate


@dataclass
class VideoProcessorParams(PixelSteps):
    """The fields of a Qwen3-VL `video_preprocessor_config.json`; defaults are transformers'
    `Qwen3VLVideoProcessor` class defaults (what an empty config gives)."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 128 * 32 * 32  # size.shortest_edge
    max_pixels: int = 32 * 32 * 768  # size.longest_edge: a budget over ALL frames of a clip
    fps: float = 2
    min_frames: int = 4
    max_frames: int = 768
    image_mean: list[float] = field(default_factory=lambda: list(IMAGENET_STANDARD_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(IMAGENET_STANDARD_STD))
    rescale_factor: float = 1 / 255
    resample: int = 3  # BICUBIC (the only filter implemented)
    cap_pixels_per_frame: bool = False  # transformers' None (the default until v5.22) means False
    max_video_tokens: int = 768
    do_sample_frames: bool = True

    @classmethod
    def from_dict(cls, d: Mapping) -> VideoProcessorParams:
        """Build from a video_preprocessor_config.json dict (pixel bounds under `size`); unknown keys are ignored."""
        names = {f.name for f in fields(cls)} - {"min_pixels", "max_pixels"}
        kwargs = {k: d[k] for k in names if d.get(k) is not None}
        size = d.get("size") or {}
        if size.get("shortest_edge") is not None:
            kwargs["min_pixels"] = int(size["shortest_edge"])
        if size.get("longest_edge") is not None:
            kwargs["max_pixels"] = int(size["longest_edge"])
        for key in ("image_mean", "image_std"):
            if key in kwargs:
                kwargs[key] = channel_list(kwargs[key])
        for key in ("patch_size", "temporal_patch_size", "merge_size", "min_frames", "max_frames",
                    "max_video_tokens", "resample"):
            if key in kwargs:
                kwargs[key] = int(kwargs[key])
        check_field_types(cls, kwargs, "video_preprocessing", {"resample": 0})
        params = cls(**kwargs)
        if params.resample != 3:
            raise ValueError(f"video resample={params.resample} is not supported; only 3 (BICUBIC) is implemented")
        return params

    @classmethod
    def from_image_params(cls, image_params: Mapping, vision_config: Mapping) -> VideoProcessorParams:
        """For exports made before video support: what transformers builds for a checkpoint without a
        video_preprocessor_config.json.

        transformers' video processor then reads preprocessor_config.json (the image config), so pixel bounds,
        mean/std and rescale/normalize flags come from the image config; patch geometry from the ViT
        (`vision_config`: patch_size, temporal_patch_size, spatial_merge_size); sampling (fps, min/max frames)
        keeps the Qwen3VLVideoProcessor defaults.
        """
        raw = {k: v for k, v in dict(image_params).items() if k not in ("resample",)}
        raw.update(patch_size=vision_config["patch_size"], temporal_patch_size=vision_config["temporal_patch_size"],
                   merge_size=vision_config["spatial_merge_size"])
        return cls.from_dict(raw)

    def to_dict(self) -> dict:
        """video_preprocessor_config.json form (pixel bounds under `size`)."""
        d = asdict(self)
        d["size"] = {"shortest_edge": d.pop("min_pixels"), "longest_edge": d.pop("max_pixels")}
        return d


def sample_frame_indices(info: VideoInfo, params: VideoProcessorParams, fps: float | None = None,
                         max_frames: int | None = None) -> np.ndarray:
    """Which frames of a source to keep = `Qwen3VLVideoProcessor.sample_frames` (fps sampling).

    Args:
        info: the source's frame count and frame rate (None: 24 is assumed, as transformers does).
        fps: frames per second to keep (default params.fps); max_frames: at most this many (default
            params.max_frames), as the processor's `fps=` / `max_frames=` arguments.
    Returns:
        int64 [num_frames], increasing; all frames (up to max_frames) when do_sample_frames is off.
    """
    total = int(info.total_frames)
    if total <= 0:
        raise VideoError("video has zero frames")
    max_frames = params.max_frames if max_frames is None else int(max_frames)
    if not params.do_sample_frames:  # the processor then keeps every frame it is given
        return np.arange(min(total, max_frames), dtype=np.int64)
    fps = params.fps if fps is None else fps
    video_fps = info.fps if info.fps else UNKNOWN_FPS
    num_frames = int(total / video_fps * fps)
    num_frames = min(max(num_frames, params.min_frames), max_frames, total)
    return np.linspace(0, total - 1, num_frames).round().astype(np.int64)


def frame_timestamps(indices, video_fps: float | None, temporal_patch_size: int) -> list[float]:
    """Seconds of each temporal patch = `Qwen3VLProcessor._calculate_timestamps`: frame indices padded with
    the last to a multiple of the patch, each patch's first and last frame times averaged."""
    indices = [int(i) for i in np.asarray(indices).reshape(-1)]
    video_fps = video_fps if video_fps else UNKNOWN_FPS
    if len(indices) % temporal_patch_size:
        indices.extend(indices[-1] for _ in range(temporal_patch_size - len(indices) % temporal_patch_size))
    times = [i / video_fps for i in indices]
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def smart_resize(num_frames: int, height: int, width: int, temporal_factor: int = 2, factor: int = 32,
                 min_pixels: int = 128 * 32 * 32, max_pixels: int = 32 * 32 * 768) -> tuple[int, int]:
    """The video `smart_resize` of video_processing_qwen3_vl.py: (height, width), multiples of `factor`,
    with num_frames x height x width within [min_pixels, max_pixels] (Python's round-half-even included)."""
    if num_frames < temporal_factor:
        raise VideoError(f"a clip needs at least {temporal_factor} frames (temporal_patch_size), got {num_frames}; "
                         "give a longer clip or pass the frame as an image")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        ratio = max(height, width) / min(height, width)
        raise VideoError(f"absolute aspect ratio must be smaller than 200, got {ratio} (frames are {width}x{height})")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def video_grid(num_frames: int, height: int, width: int, params: VideoProcessorParams,
               max_pixels: int | None = None) -> tuple[int, int, tuple[int, int, int]]:
    """Resized frame size and patch grid of a clip, without decoding it (for the context check).

    = `Qwen3VLVideoProcessor.resize` (with `cap_pixels_per_frame`) and `get_num_of_video_patches`.

    Args:
        num_frames: frames sampled; height, width: the source's frame size;
        max_pixels: override of params.max_pixels (size.longest_edge), the budget over all frames.
    Returns:
        (resized_height, resized_width, (grid_t, grid_h, grid_w)); tokens = grid_t * grid_h * grid_w / merge**2.
    Raises:
        VideoError: fewer than temporal_patch_size frames, aspect ratio over 200, or (do_resize off) a frame
        size that is not a multiple of patch_size * merge_size.
    """
    factor = params.patch_size * params.merge_size
    budget = params.max_pixels if max_pixels is None else int(max_pixels)
    if params.do_resize:
        if params.cap_pixels_per_frame:
            frame_cap = params.max_video_tokens * factor * factor
            per_frame = max(min(frame_cap, budget // num_frames), int(params.min_pixels * 1.05))
            budget = per_frame * num_frames
        height, width = smart_resize(num_frames, height, width, params.temporal_patch_size, factor,
                                     params.min_pixels, budget)
    elif height % factor or width % factor:
        raise VideoError(f"frames of {width}x{height} are not a multiple of {factor}; enable do_resize")
    elif num_frames < 1:
        raise VideoError("video has zero frames")
    grid_t = -(-num_frames // params.temporal_patch_size)
    return height, width, (grid_t, height // params.patch_size, width // params.patch_size)


def _value_table(params: VideoProcessorParams) -> np.ndarray:
    """float32 [C, 256]: each uint8 value rescaled and normalized with torchvision's fused float32 ops.

    The processor does `normalize(x.float(), mean * (1 / rescale_factor), std * (1 / rescale_factor))`,
    i.e. (x - m) / s per channel in float32 with m, s rounded to float32; rescale alone is x * factor.
    """
    values = np.arange(256, dtype=np.float32)[None, :].repeat(3, axis=0)  # [C, 256]
    mean = np.asarray(params.image_mean, dtype=np.float32)[:, None]
    std = np.asarray(params.image_std, dtype=np.float32)[:, None]
    if params.do_rescale and params.do_normalize:
        scale = np.float32(1.0 / params.rescale_factor)
        return (values - mean * scale) / (std * scale)
    if params.do_normalize:
        return (values - mean) / std
    if params.do_rescale:
        return values * np.float32(params.rescale_factor)
    return values


def preprocess_video(frames: np.ndarray, params: VideoProcessorParams,
                     max_pixels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sampled frames -> model inputs, equal to transformers' Qwen3VLVideoProcessor `pixel_values_videos`.

    Args:
        frames: uint8 [T, H, W, 3] RGB, the sampled frames (kernels.video.load_video).
        max_pixels: override of params.max_pixels (the budget over all frames).
    Returns:
        pixel_values: float32 [grid_t * grid_h * grid_w, 3 * temporal_patch_size * P * P];
        video_grid_thw: int64 [1, 3].
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise VideoError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    num_frames, height, width, _ = frames.shape
    new_height, new_width, (grid_t, grid_h, grid_w) = video_grid(num_frames, height, width, params, max_pixels)
    video = np.ascontiguousarray(frames.transpose(0, 3, 1, 2))  # [T, C, H, W]
    if params.do_resize:
        video = resize_frames(video, new_height, new_width)
    table = _value_table(params)
    pixels = np.empty(video.shape, dtype=np.float32)
    for c in range(3):
        np.take(table[c], video[:, c], out=pixels[:, c])
    return patchify(pixels, params.patch_size, params.merge_size, params.temporal_patch_size), \
        np.array([[grid_t, grid_h, grid_w]], dtype=np.int64)


def patchify(video: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int) -> np.ndarray:
    """float32 [T, C, H, W] -> [grid_t * grid_h * grid_w, C * temporal_patch_size * P * P]
    (the processor's `patchify`: last frame repeated up to a multiple of the temporal patch)."""
    if pad := -len(video) % temporal_patch_size:
        video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
    frames, channels, height, width = video.shape
    grid_t, grid_h, grid_w = frames // temporal_patch_size, height // patch_size, width // patch_size
    m, p = merge_size, patch_size
    patches = video.reshape(grid_t, temporal_patch_size, channels, grid_h // m, m, p, grid_w // m, m, p)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [gt, gh/m, gw/m, m, m, C, T, P, P]
    return patches.reshape(grid_t * grid_h * grid_w, channels * temporal_patch_size * p * p)
