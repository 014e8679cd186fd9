"""The serve-time contract between the runtime and a model family, written down.

Every family's `Family(manifest)` subclasses `FamilyBase`: the runtime (runtime/model.py,
runtime/engine/step_loop.py, the server and the CLI) calls only what is declared here, and reads the
attributes without `getattr` fallbacks, so the defaults below are where "this family has nothing to
say" lives. Torch-free.

A family's prompt goes through, in order:
  preprocess(sources)          images and clips -> MediaInputs (pixels, one grid row per item, kinds)
  tokenize(tokenizer, text, m) rendered chat text -> token ids, placeholders expanded per item
  prepare(ids, pixels, media_grid, kinds) -> the family's PreparedPrompt (input_ids, pixel_values,
                               media_grid, position_ids, image_tokens, dump())
  split_images / split_frames  the prompt's items, and an item's pieces, for one vision call each
  vision_feeds(pixels, media_grid) the vision graph's inputs for one piece
  prefill_feeds / decode_feeds the decoder graph's inputs (vision outputs spliced at media_token_mask)

`media_grid` is each image or clip's shape row, in the family's own terms: Qwen3-VL (t, h, w) patches;
MiniGPT-4 its query-token count; SmolVLM (rows, cols) of tiles. The runtime never reads inside a row:
it hands the rows back to the family (split_images, image_token_counts, vision_feeds) and hashes them
with the pixels for the image-feature cache.
"""
from __future__ import annotations

import numpy as np

from vlm_core.models.config import TextConfig
from vlm_core.models.media import MediaInputs


class FamilyBase:
    """Defaults and the required methods of a family (see the module docstring for the call order)."""

    name: str = ""
    # Decoder inputs -> (batch axis, sequence axis): the engine cuts prompts into chunks along the sequence
    # axis and stacks one decode row per sequence along the batch axis.
    decoder_feed_axes: dict = {}
    # Vision outputs -> the axis along which one item's (or piece's) rows follow another's.
    vision_output_axes: tuple = (0,)
    # Scale of the boxes/points the model writes for grounding prompts (Qwen3-VL: 0..1000); None: no boxes.
    grounding_scale: float | None = None
    reads_video: bool = False  # whether video parts (models.media.VideoPart) are read
    stop_strings: tuple = ()  # text that ends an answer besides the EOS tokens (e.g. "###" for Vicuna v0)
    image_token_id: int = -1  # the placeholder token the vision features replace

    def __init__(self, manifest: dict):
        """What every family reads from the manifest: the text config, the special tokens, the image token."""
        self.manifest = manifest
        self.text_config = TextConfig.from_dict(manifest["text_config"])
        self.tokens = manifest["special_tokens"]
        self.image_token_id = int(self.tokens["image_token_id"])

    def check_pixel_budget(self, min_pixels=None, max_pixels=None, names: dict | None = None) -> None:
        """Refuse per-image pixel bounds that cannot work (ParameterError naming them as `names` spells them);
        a family whose images have no pixel budget (a fixed input size, tiles) ignores them."""

    def fit_image_budget(self, sizes: list, token_limit: int, min_pixels=None) -> int | None:
        """A per-image max_pixels, below the model's own, under which images of `sizes` ((height, width) each, in
        prompt order) take at most `token_limit` prompt tokens together; None when the model's own budget already
        fits them, when no budget does, or when this family's images cost a fixed number of tokens (nothing to
        scale: MiniGPT-4)."""
        return None

    # --- required -------------------------------------------------------------------------------
    def preprocess(self, sources, min_pixels=None, max_pixels=None, video=None, token_limit=None) -> MediaInputs:
        """Images (and clips where `reads_video`) in prompt order -> MediaInputs."""
        raise NotImplementedError

    def tokenize(self, tokenizer, text: str, media: MediaInputs | None) -> np.ndarray:
        """Rendered prompt text -> int64 token ids with every placeholder expanded."""
        raise NotImplementedError

    def prepare(self, input_ids, pixel_values=None, media_grid=None, media_kinds=()):
        """Token ids + the items' arrays (pixels, `media_grid` rows, "image"/"video" kinds) -> the family's
        PreparedPrompt, which carries `media_grid` under that name."""
        raise NotImplementedError

    def vision_feeds(self, pixel_values: np.ndarray, media_grid) -> dict:
        """The vision graph's inputs for one vision call."""
        raise NotImplementedError

    def split_images(self, pixel_values: np.ndarray, media_grid) -> list:
        """A prompt's item arrays -> [(pixel_values, media_grid)] one pair per image or clip, in order."""
        raise NotImplementedError

    def image_token_counts(self, media_grid) -> list:
        """Prompt tokens each item occupies, in order."""
        raise NotImplementedError

    def prefill_feeds(self, prompt, token_embeds: np.ndarray, vision_outputs) -> dict:
        """Decoder inputs for the whole prompt (batch 1), vision outputs spliced in."""
        raise NotImplementedError

    def decode_feeds(self, prompt, token_embed: np.ndarray, cache_position: int) -> dict:
        """Decoder inputs for new tokens after the prompt from `cache_position` on: token_embed [H] (one token)
        or [S, H] (a run of them: jump-forward's forced tokens)."""
        raise NotImplementedError

    # --- defaults -------------------------------------------------------------------------------
    def media_token_mask(self, input_ids: np.ndarray) -> np.ndarray:
        """Which prompt tokens take vision features (item after item, in prompt order)."""
        return np.asarray(input_ids) == self.image_token_id

    def split_frames(self, pixel_values: np.ndarray, media_grid, max_patches: int) -> list:
        """One item -> [(pixel_values, media_grid)] pieces for separate vision calls; by default one piece."""
        return [(pixel_values, media_grid)]

    def decode_rows_feeds(self, prompts: list, token_embeds: np.ndarray, cache_positions) -> dict:
        """Decoder inputs for one decode step of several rows at once: row r's pending token (`token_embeds`
        [rows, H]) at `cache_positions[r]` after `prompts[r]`. By default each row's `decode_feeds` joined along
        the batch axis; the families override it with one vectorized call (the decode step's per-row Python)."""
        parts = [self.decode_feeds(p, e, int(c)) for p, e, c in zip(prompts, token_embeds, cache_positions)]
        return {name: np.concatenate([part[name] for part in parts], axis=self.decoder_feed_axes[name][0])
                for name in parts[0]}
