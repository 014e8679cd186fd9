"""Qwen3-VL (2B/4B/8B): prompt layout, image inputs, M-RoPE positions and deepstack splicing.

Torch-free. The runtime talks to a family only through `Family`; see runtime/engine.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels.grounding import GROUNDING_SCALE

from . import positions
from .preprocess import ImageProcessorParams, preprocess_images
from .prompt import expand_image_pads, tokenize_prompt

NAME = "qwen3_vl"


@dataclass
class PreparedPrompt:
    """Everything the graphs need for one prompt, in the model's own input names."""

    input_ids: np.ndarray  # int64 [S]
    pixel_values: np.ndarray | None  # float32 [n_patches, C*T*P*P]
    image_grid_thw: np.ndarray | None  # int64 [n_images, 3]
    position_ids: np.ndarray  # int64 [3, S]
    rope_delta: int
    image_tokens: int = 0

    def dump(self) -> dict:
        """The model inputs as arrays, for --dump-inputs."""
        arrays = {"input_ids": self.input_ids[None], "position_ids": self.position_ids[:, None]}
        arrays["pixel_values"] = self.pixel_values if self.pixel_values is not None else np.zeros((0, 0), np.float32)
        arrays["image_grid_thw"] = (self.image_grid_thw if self.image_grid_thw is not None
                                    else np.zeros((0, 3), np.int64))
        return arrays


class Family:
    """Qwen3-VL's serve-time behaviour, configured from manifest.json."""

    name = NAME
    # Decoder inputs -> (batch axis, sequence axis): the engine slices prompts into chunks along the
    # sequence axis and stacks one decode row per sequence along the batch axis.
    decoder_feed_axes = {"inputs_embeds": (0, 1), "position_ids": (1, 2), "deepstack_embeds": (1, 2)}
    # Vision outputs -> the axis along which one image's rows follow another's.
    vision_output_axes = (0, 1)  # image_embeds [n, H], deepstack_embeds [K, n, H]
    # Answers to "locate"/"detect"/"point" prompts hold bbox_2d / point_2d JSON relative to the image, 0..1000
    # (kernels/grounding.py gives the sources); the engine turns them into pixels (GenerationResult.boxes).
    grounding_scale = GROUNDING_SCALE

    def __init__(self, manifest: dict):
        self.manifest = manifest
        self.vision_config = manifest["vision_config"]
        self.text_config = manifest["text_config"]
        self.tokens = manifest["special_tokens"]
        self.image_params = ImageProcessorParams.from_dict(manifest["preprocessing"])
        self.merge_size = int(self.vision_config["spatial_merge_size"])
        self.image_token_id = int(self.tokens["image_token_id"])

    # --- images -------------------------------------------------------------------------------
    def preprocess(self, images, min_pixels=None, max_pixels=None):
        """Images (paths, bytes or PIL) -> (pixel_values, image_grid_thw)."""
        return preprocess_images(images, self.image_params, min_pixels=min_pixels, max_pixels=max_pixels)

    def vision_feeds(self, pixel_values: np.ndarray, image_grid_thw: np.ndarray) -> dict:
        """Inputs of the vision graph for a batch of images (all grid-dependent tables in NumPy)."""
        feeds = positions.vision_inputs(image_grid_thw, int(self.vision_config["num_position_embeddings"]),
                                        self.merge_size)
        feeds["pixel_values"] = pixel_values.astype(np.float32, copy=False)
        return feeds

    def split_images(self, pixel_values: np.ndarray, image_grid_thw: np.ndarray) -> list:
        """A prompt's image arrays -> [(pixel_values, image_grid_thw)] one pair per image, in order."""
        counts = np.asarray(image_grid_thw).prod(-1)
        starts = np.concatenate([[0], np.cumsum(counts)])
        return [(pixel_values[starts[i]:starts[i + 1]], image_grid_thw[i:i + 1]) for i in range(len(counts))]

    def image_token_counts(self, image_grid_thw: np.ndarray) -> list:
        """Prompt tokens each image occupies (its merged patches), in order."""
        return [int(n) // self.merge_size ** 2 for n in np.asarray(image_grid_thw).prod(-1)]

    # --- prompt ---------------------------------------------------------------------------------
    def prepare(self, input_ids: np.ndarray, pixel_values=None, image_grid_thw=None) -> PreparedPrompt:
        """Token ids (image pads already expanded) + image arrays -> PreparedPrompt with M-RoPE positions."""
        input_ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
        n_pads = int((input_ids == self.image_token_id).sum())
        expected = 0 if image_grid_thw is None else int(np.asarray(image_grid_thw).prod(-1).sum()) // self.merge_size ** 2
        if n_pads != expected:
            raise ValueError(f"the prompt holds {n_pads} image tokens but the images need {expected}")
        position_ids, delta = positions.get_rope_index(input_ids, image_grid_thw, self.image_token_id, self.merge_size)
        return PreparedPrompt(input_ids, pixel_values, image_grid_thw, position_ids, delta, n_pads)

    # --- decoder feeds --------------------------------------------------------------------------
    def prefill_feeds(self, prompt: PreparedPrompt, token_embeds: np.ndarray, vision_outputs) -> dict:
        """Decoder inputs for the whole prompt (batch 1), images spliced in at their pad tokens.

        token_embeds: float32 [S, H]; vision_outputs: (image_embeds [n, H], deepstack [K, n, H]) or None.
        """
        seq, hidden = token_embeds.shape
        num_deepstack = int(self.text_config["num_deepstack"])
        inputs_embeds = np.array(token_embeds, dtype=np.float32)
        deepstack = np.zeros((num_deepstack, 1, seq, hidden), dtype=np.float32)
        if vision_outputs is not None:
            image_embeds, deepstack_embeds = vision_outputs
            is_image = prompt.input_ids == self.image_token_id
            inputs_embeds[is_image] = image_embeds
            deepstack[:, 0, is_image] = deepstack_embeds
        return {"inputs_embeds": inputs_embeds[None], "position_ids": prompt.position_ids[:, None],
                "deepstack_embeds": deepstack}

    def decode_feeds(self, prompt: PreparedPrompt, token_embed: np.ndarray, cache_position: int) -> dict:
        """Decoder inputs for one new token at cache position `cache_position` (0-based)."""
        hidden = token_embed.shape[-1]
        position = cache_position + prompt.rope_delta
        num_deepstack = int(self.text_config["num_deepstack"])
        return {"inputs_embeds": token_embed.reshape(1, 1, hidden).astype(np.float32, copy=False),
                "position_ids": np.full((3, 1, 1), position, dtype=np.int64),
                "deepstack_embeds": np.zeros((num_deepstack, 1, 1, hidden), dtype=np.float32)}

    def tokenize(self, tokenizer, text: str, image_grid_thw) -> np.ndarray:
        """Rendered prompt text -> int64 token ids, each image pad expanded to its token count."""
        if image_grid_thw is not None:
            text = expand_image_pads(text, image_grid_thw, self.merge_size)
        elif "<|image_pad|>" in text:
            raise ValueError("the prompt holds an image pad but no image was given")
        return tokenize_prompt(tokenizer, text)
