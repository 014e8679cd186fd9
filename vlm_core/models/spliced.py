"""What families with a LLaMA-style text decoder have in common (MiniGPT-4, SmolVLM): plain 1-D positions
(the decoder graph of export/llama_graph.py) and vision features that replace the embeddings of the
prompt's image-token slots one for one, in prompt order. A family built this way subclasses
`SplicedFamily` and writes only its preprocessing, prompt and `prepare` checks. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlm_core.models.contract import FamilyBase


@dataclass
class PreparedPrompt:
    """Token ids (image slots marked with the image token id), pixels and 1-D positions for one prompt."""

    input_ids: np.ndarray  # int64 [S]
    pixel_values: np.ndarray | None  # float32, the family's layout (e.g. [n_images or n_tiles, 3, H, W])
    media_grid: np.ndarray | None  # int64 [n_images, ...]: each image's shape row in the family's terms
    position_ids: np.ndarray  # int64 [S]
    image_tokens: int = 0

    def dump(self) -> dict:
        return {"input_ids": self.input_ids[None], "position_ids": self.position_ids[None],
                "pixel_values": self.pixel_values if self.pixel_values is not None
                else np.zeros((0, 3, 0, 0), np.float32)}


class SplicedFamily(FamilyBase):
    """Decoder feeds for 1-D positions with vision features spliced in at `image_token_id` slots."""

    # Decoder inputs -> (batch axis, sequence axis), as in models/qwen3_vl.
    decoder_feed_axes = {"inputs_embeds": (0, 1), "position_ids": (0, 1)}
    vision_output_axes = (0,)  # image_embeds [n, tokens per image (or tile), H]

    def prepared(self, input_ids: np.ndarray, pixel_values, media_grid, expected_slots: int) -> PreparedPrompt:
        """The PreparedPrompt of checked ids: ValueError when the prompt's image slots are not what the images
        fill (`expected_slots`)."""
        n_slots = int((input_ids == self.image_token_id).sum())
        if n_slots != expected_slots:
            raise ValueError(f"the prompt holds {n_slots} image token slots but the images fill {expected_slots}")
        has_images = pixel_values is not None and len(pixel_values) > 0
        return PreparedPrompt(input_ids, pixel_values if has_images else None, media_grid if has_images else None,
                              np.arange(len(input_ids), dtype=np.int64), n_slots)

    def prefill_feeds(self, prompt: PreparedPrompt, token_embeds: np.ndarray, vision_outputs) -> dict:
        """Decoder inputs for the whole prompt; image embeddings spliced in at the image-token slots, in order.

        vision_outputs: the vision graph's outputs ([image_embeds [n, tokens, H]]) or None.
        """
        inputs_embeds = np.array(token_embeds, dtype=np.float32)
        if vision_outputs is not None:
            image_embeds = np.asarray(vision_outputs[0], dtype=np.float32)
            inputs_embeds[prompt.input_ids == self.image_token_id] = image_embeds.reshape(-1, inputs_embeds.shape[1])
        return {"inputs_embeds": inputs_embeds[None], "position_ids": prompt.position_ids[None]}

    def decode_feeds(self, prompt: PreparedPrompt, token_embed: np.ndarray, cache_position: int) -> dict:
        """Decoder inputs for new tokens from `cache_position` on: token_embed [H] (one) or [S, H] (a run)."""
        hidden = token_embed.shape[-1]
        embeds = token_embed.reshape(1, -1, hidden).astype(np.float32, copy=False)
        return {"inputs_embeds": embeds,
                "position_ids": np.arange(embeds.shape[1], dtype=np.int64)[None] + cache_position}

    def decode_rows_feeds(self, prompts: list, token_embeds: np.ndarray, cache_positions) -> dict:
        """One decode step's inputs for every row at once (FamilyBase.decode_rows_feeds): 1-D positions are the
        cache positions themselves."""
        return {"inputs_embeds": np.asarray(token_embeds, np.float32)[:, None],
                "position_ids": np.asarray(cache_positions, np.int64)[:, None]}
