"""torchvision's functional API as far as transformers' Qwen3-VL video processor uses it, so the real
processor runs as the reference in the tests (torchvision's wheel does not load with the CPU torch used here).
"""
from __future__ import annotations

import contextlib
import enum
import types

import pytest
import torch

# Qwen3VLVideoProcessor calls torchvision's functional API (`tvF`), whose wheel does not load with the CPU
# torch used here. The shim below implements only what the processor calls, with the torch ops torchvision
# itself runs on CPU tensors (torchvision/transforms/v2/functional/_geometry.py `resize_image`: uint8 BICUBIC
# goes straight to `torch.nn.functional.interpolate(..., antialias=True)` on the uint8 tensor; `_misc.py`
# `normalize_image`: sub_(mean).div_(std) in the image's dtype). Everything else is transformers' own code.

class _InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _tv_resize(image, size, interpolation=_InterpolationMode.BILINEAR, antialias=True, max_size=None):
    height, width = size
    channels, old_height, old_width = image.shape[-3:]
    if (height, width) == (old_height, old_width):
        return image
    assert interpolation is _InterpolationMode.BICUBIC and image.dtype == torch.uint8, "shim covers uint8 bicubic"
    batch = image.reshape(-1, channels, old_height, old_width)
    batch = torch.nn.functional.interpolate(batch, size=[height, width], mode="bicubic", align_corners=False,
                                            antialias=antialias)
    return batch.reshape(image.shape[:-3] + (channels, height, width))


def _tv_normalize(image, mean, std, inplace=False):
    mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
    image = image.sub_(mean) if inplace else image.sub(mean)
    return image.div_(std)


def _tv_grayscale_to_rgb(image):
    return image if image.shape[-3] != 1 else image.repeat_interleave(3, dim=-3)


def _tv_to_dtype(image, dtype=torch.float32, scale=False):
    raise NotImplementedError("the shim does not cover RGBA frames")


TV_SHIM = types.SimpleNamespace(InterpolationMode=_InterpolationMode, resize=_tv_resize, normalize=_tv_normalize,
                                grayscale_to_rgb=_tv_grayscale_to_rgb, to_dtype=_tv_to_dtype)




@contextlib.contextmanager
def torchvision_shim():
    """Install TV_SHIM as `tvF` wherever transformers' video processing looks it up (undone on exit)."""
    import transformers.image_processing_backends as backends
    import transformers.models.qwen3_vl.video_processing_qwen3_vl as qwen3_video
    import transformers.video_processing_utils as video_utils
    from transformers.image_utils import PILImageResampling

    with pytest.MonkeyPatch.context() as mp:
        for module in (video_utils, backends, qwen3_video):
            mp.setattr(module, "tvF", TV_SHIM, raising=False)
        mp.setattr(backends, "pil_torch_interpolation_mapping",
                   {PILImageResampling.BICUBIC: _InterpolationMode.BICUBIC}, raising=False)
        yield
