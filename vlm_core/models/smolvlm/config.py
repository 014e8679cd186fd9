"""SmolVLM's vision config: the common VisionConfig (SigLIP) plus the connector's. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass

from vlm_core.models.config import VisionConfig


@dataclass(kw_only=True)
class SmolVLMVisionConfig(VisionConfig):
    """manifest["vision_config"] of a SmolVLM export."""

    scale_factor: int  # the pixel shuffle's: scale_factor² patches become one token
    tokens_per_tile: int  # (image_size / patch_size)² / scale_factor²: prompt tokens per tile
