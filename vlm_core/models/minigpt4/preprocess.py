"""MiniGPT-4 / BLIP-2 image preprocessing, NumPy + Pillow only.

Equal to transformers' BlipImageProcessor (PIL backend) with MiniGPT-4's settings, and to
MiniGPT-4's own `Blip2ImageEvalProcessor` (torchvision Resize((S, S), BICUBIC) on a PIL image,
ToTensor, Normalize with the CLIP mean/std): resize to image_size x image_size (no crop, the aspect
ratio is not kept), rescale by 1/255, normalize. Output float32 [n_images, 3, S, S].
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from vlm_core.kernels.image import load_image, normalize, rescale, resize
from vlm_core.models.config import check_field_types

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class BlipImageParams:
    image_size: int = 224
    image_mean: list = field(default_factory=lambda: list(OPENAI_CLIP_MEAN))
    image_std: list = field(default_factory=lambda: list(OPENAI_CLIP_STD))
    resample: int = 3  # PIL BICUBIC
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "BlipImageParams":
        """From the manifest's preprocessing entry or a BlipImageProcessor preprocessor_config.json."""
        kwargs = {k: d[k] for k in ("image_mean", "image_std", "rescale_factor", "do_resize", "do_rescale",
                                    "do_normalize", "image_size") if d.get(k) is not None}
        if d.get("resample") is not None:
            kwargs["resample"] = int(d["resample"])
        size = d.get("size")
        if "image_size" not in kwargs and isinstance(size, dict) and "height" in size:
            if size["height"] != size.get("width", size["height"]):
                raise ValueError(f"BLIP-2 preprocessing needs a square size, got {size}")
            kwargs["image_size"] = int(size["height"])
        check_field_types(cls, kwargs, "preprocessing", {"resample": 0})
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return asdict(self)


def preprocess_images(images, params: BlipImageParams) -> np.ndarray:
    """Images (paths, bytes or PIL) -> float32 [n, 3, S, S]."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    out = []
    for src in images:
        image = load_image(src)
        if params.do_resize:
            array = resize(image, params.image_size, params.image_size, resample=params.resample)
        else:
            array = np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))
        pixels = rescale(array, params.rescale_factor) if params.do_rescale else array.astype(np.float32)
        if params.do_normalize:
            pixels = normalize(pixels, params.image_mean, params.image_std)
        out.append(pixels.astype(np.float32, copy=False))
    return np.stack(out) if out else np.zeros((0, 3, params.image_size, params.image_size), np.float32)
