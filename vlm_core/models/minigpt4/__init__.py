"""MiniGPT-4 (and any BLIP-2-layout model with a LLaMA text model): EVA ViT-g + Q-Former + linear
projection into Vicuna / LLaMA. Each image becomes `num_query_tokens` (32) embeddings placed where
MiniGPT-4 puts them: between the prompt segments around ``<ImageHere>``.

Torch-free. The runtime talks to a family only through `Family`; see runtime/model.py.
"""
from __future__ import annotations

import numpy as np

from vlm_core.models.media import MediaInputs, UnsupportedMedia, VideoPart
from vlm_core.models.minigpt4.config import MiniGPT4VisionConfig
from vlm_core.models.minigpt4.preprocess import BlipImageParams, preprocess_images
from vlm_core.models.minigpt4.prompt import TEMPLATES, tokenize_segments
from vlm_core.models.spliced import PreparedPrompt, SplicedFamily

NAME = "minigpt4"


class Family(SplicedFamily):
    """MiniGPT-4's serve-time behaviour, configured from manifest.json (the contract: models/contract.py)."""

    name = NAME
    reads_video = False  # single images only: a video part is refused (UnsupportedMedia)

    def __init__(self, manifest: dict):
        super().__init__(manifest)
        self.vision_config = MiniGPT4VisionConfig.from_dict(manifest["vision_config"])
        self.image_params = BlipImageParams.from_dict(manifest["preprocessing"])
        self.num_query_tokens = int(self.vision_config.num_query_tokens)
        self.template = manifest.get("prompt", {}).get("template", "vicuna_v0")
        # Text that ends an answer (the engine adds these to the caller's stop strings): "###" for Vicuna v0.
        self.stop_strings = list(manifest.get("prompt", {}).get("stop_strings", TEMPLATES[self.template]["stop"]))

    # --- images -------------------------------------------------------------------------------
    def preprocess(self, images, min_pixels=None, max_pixels=None, video=None, token_limit=None) -> MediaInputs:
        """Images -> MediaInputs(pixel_values [n, 3, S, S], query tokens per image [n]). Pixel budgets do not
        apply; clips are refused (MiniGPT-4 reads single images)."""
        images = list(images)
        if any(isinstance(image, VideoPart) for image in images):
            raise UnsupportedMedia("this model (MiniGPT-4) reads images only, not video; give frames as images "
                                   "or use a Qwen3-VL model")
        pixel_values = preprocess_images(images, self.image_params)
        return MediaInputs(pixel_values, np.full((len(pixel_values),), self.num_query_tokens, dtype=np.int64),
                           ("image",) * len(pixel_values), [None] * len(pixel_values))

    def vision_feeds(self, pixel_values: np.ndarray, media_grid=None) -> dict:
        return {"pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32)}

    def split_images(self, pixel_values: np.ndarray, media_grid=None) -> list:
        """A prompt's image arrays -> [(pixel_values, query counts)] one pair per image, in order."""
        return [(pixel_values[i:i + 1], np.full((1,), self.num_query_tokens, dtype=np.int64))
                for i in range(len(pixel_values))]

    def image_token_counts(self, media_grid) -> list:
        """Prompt tokens each image occupies (its query embeddings), in order."""
        return [int(n) for n in np.asarray(media_grid).reshape(-1)]

    # --- prompt ---------------------------------------------------------------------------------
    def tokenize(self, tokenizer, text: str, media: MediaInputs | None) -> np.ndarray:
        """Rendered prompt -> ids: split at <ImageHere>, BOS on the first segment only, query slots between."""
        n_images = 0 if media is None else len(media.grid_thw)
        return tokenize_segments(tokenizer, text, n_images, self.num_query_tokens, self.image_token_id)

    def prepare(self, input_ids: np.ndarray, pixel_values=None, media_grid=None, media_kinds=()) -> PreparedPrompt:
        input_ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
        n_images = 0 if pixel_values is None else len(pixel_values)
        if media_grid is None and pixel_values is not None:
            media_grid = np.full((n_images,), self.num_query_tokens, dtype=np.int64)
        return self.prepared(input_ids, pixel_values, media_grid, n_images * self.num_query_tokens)
