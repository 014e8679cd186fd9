"""Qwen3-VL's vision config: the common VisionConfig plus the patch geometry and deepstack layers. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass, field

from vlm_core.models.config import VisionConfig


@dataclass(kw_only=True)
class Qwen3VLVisionConfig(VisionConfig):
    """manifest["vision_config"] of a Qwen3-VL export (its `depth` is read as `num_layers`)."""

    spatial_merge_size: int  # patches merged per side into one prompt token (2)
    temporal_patch_size: int  # frames per patch (2; an image is repeated to fill it)
    in_channels: int
    num_position_embeddings: int  # learned position table size (a square grid), interpolated per image
    deepstack_visual_indexes: list = field(default_factory=list)  # ViT blocks whose features feed the decoder
