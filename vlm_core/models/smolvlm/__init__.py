"""SmolVLM (and the Idefics3 layout it shares): a SigLIP encoder read tile by tile, a pixel-shuffle connector
and a LLaMA-architecture (SmolLM2) decoder. An image becomes tiles of the encoder's size (rows x cols of the
image plus a global view, or one tile for an image that does not split); each tile becomes `image_seq_len`
embeddings placed at that many <image> tokens of the prompt, between the row/column markers transformers'
SmolVLMProcessor writes.

Torch-free. The runtime talks to a family only through `Family` (the contract: models/contract.py).
"""
from __future__ import annotations

import numpy as np

from vlm_core.models.media import MediaInputs, UnsupportedMedia, VideoPart
from vlm_core.models.smolvlm.config import SmolVLMVisionConfig
from vlm_core.models.smolvlm.preprocess import (
    SmolVLMImageParams,
    preprocess_images,
    tile_count,
)
from vlm_core.models.smolvlm.prompt import (
    FAKE_IMAGE_TOKEN,
    GLOBAL_IMAGE_TOKEN,
    IMAGE_TOKEN,
    expand_images,
)
from vlm_core.models.spliced import PreparedPrompt, SplicedFamily

NAME = "smolvlm"


class Family(SplicedFamily):
    """SmolVLM's serve-time behaviour, configured from manifest.json."""

    name = NAME
    reads_video = False  # SmolVLM2's video input is not served (yet): a video part is refused

    def __init__(self, manifest: dict):
        super().__init__(manifest)
        self.vision_config = SmolVLMVisionConfig.from_dict(manifest["vision_config"])
        self.image_params = SmolVLMImageParams.from_dict(manifest["preprocessing"])
        prompt = manifest.get("prompt", {})
        self.image_seq_len = int(prompt.get("image_seq_len", self.vision_config.tokens_per_tile))
        self.strings = (prompt.get("fake_image_token", FAKE_IMAGE_TOKEN), prompt.get("image_token", IMAGE_TOKEN),
                        prompt.get("global_image_token", GLOBAL_IMAGE_TOKEN))

    # --- images -------------------------------------------------------------------------------
    def preprocess(self, images, min_pixels=None, max_pixels=None, video=None, token_limit=None) -> MediaInputs:
        """Images -> MediaInputs(tiles [n_tiles, 3, T, T], (rows, cols) per image). Qwen's pixel budgets do
        not apply (the tiling is the checkpoint's preprocessor_config.json); clips are refused."""
        images = list(images)
        if any(isinstance(image, VideoPart) for image in images):
            raise UnsupportedMedia("this model (SmolVLM) is served for images only, not video; give frames as "
                                   "images or use a Qwen3-VL model")
        pixel_values, rows_cols = preprocess_images(images, self.image_params)
        return MediaInputs(pixel_values, rows_cols, ("image",) * len(rows_cols), [None] * len(rows_cols))

    def vision_feeds(self, pixel_values: np.ndarray, media_grid=None) -> dict:
        return {"pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32)}

    def split_images(self, pixel_values: np.ndarray, media_grid) -> list:
        """A prompt's tiles -> [(tiles, (rows, cols))] one pair per image, in order."""
        grid = np.asarray(media_grid, dtype=np.int64).reshape(-1, 2)
        pieces, start = [], 0
        for rows, cols in grid.tolist():
            count = tile_count(rows, cols)
            pieces.append((pixel_values[start:start + count], np.array([[rows, cols]], dtype=np.int64)))
            start += count
        return pieces

    def split_frames(self, pixel_values: np.ndarray, media_grid, max_patches: int) -> list:
        """One image's tiles -> pieces of whole tiles, each at most `max_patches` patches (at least one tile).
        Tiles never attend to each other in the vision graph, so the features are the same piece by piece,
        while one call's activations (attention scores above all) stay those of a few tiles instead of up to
        17 (a 512-pixel SigLIP tile is 1024 patches)."""
        per_tile = (self.vision_config.image_size // self.vision_config.patch_size) ** 2
        per_call = max(1, max_patches // per_tile)
        return [(pixel_values[first:first + per_call], media_grid) for first in range(0, len(pixel_values), per_call)]

    def image_token_counts(self, media_grid) -> list:
        """Prompt tokens each image occupies: image_seq_len per tile."""
        grid = np.asarray(media_grid, dtype=np.int64).reshape(-1, 2)
        return [tile_count(rows, cols) * self.image_seq_len for rows, cols in grid.tolist()]

    # --- prompt ---------------------------------------------------------------------------------
    def tokenize(self, tokenizer, text: str, media: MediaInputs | None) -> np.ndarray:
        """Rendered prompt -> ids, each <image> expanded to its tiles' markers and token runs, as
        transformers' SmolVLMProcessor writes them."""
        rows_cols = np.zeros((0, 2), np.int64) if media is None else media.grid_thw
        fake, image, global_image = self.strings
        text = expand_images(text, rows_cols, self.image_seq_len, fake, image, global_image)
        # As transformers' apply_chat_template(tokenize=True): no special tokens added when the rendered text
        # already starts with BOS (SmolVLM's template writes <|im_start|> itself).
        bos_id = self.tokens.get("bos_token_id")
        bos = tokenizer.id_to_token(int(bos_id)) if bos_id is not None else None
        add_special = not (bos and text.startswith(bos))
        return np.asarray(tokenizer.encode(text, add_special_tokens=add_special).ids, dtype=np.int64)

    def prepare(self, input_ids: np.ndarray, pixel_values=None, media_grid=None, media_kinds=()) -> PreparedPrompt:
        input_ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
        n_tiles = 0 if pixel_values is None else len(pixel_values)
        grid = None if not n_tiles else np.asarray(media_grid, dtype=np.int64).reshape(-1, 2)
        expected = 0 if grid is None else sum(self.image_token_counts(grid))
        if grid is not None and sum(tile_count(r, c) for r, c in grid.tolist()) != n_tiles:
            raise ValueError(f"{n_tiles} tiles given for images of {grid.tolist()} (rows, cols)")
        return self.prepared(input_ids, pixel_values, grid, expected)
