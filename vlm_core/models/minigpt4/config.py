"""MiniGPT-4's vision config: the common VisionConfig (EVA ViT-g) plus the Q-Former's. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass

from vlm_core.models.config import VisionConfig


@dataclass(kw_only=True)
class MiniGPT4VisionConfig(VisionConfig):
    """manifest["vision_config"] of a MiniGPT-4 export."""

    num_query_tokens: int  # Q-Former queries: prompt tokens per image (32)
    qformer_hidden_size: int
    qformer_layers: int
