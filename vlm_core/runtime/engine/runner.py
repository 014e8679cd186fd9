"""The model runner: what runs the exported graphs, for the engine's steps and the facade's one-off calls alike.

It holds the ONNX Runtime sessions, the token-embedding table, the family (which turns token embeddings and
vision outputs into the decoder's inputs) and the KV geometry, and it does four things: embed token ids, run
the decoder over a KV cache (one sequence's, for prompt chunks; rows of the batch, for a decode step), run the
vision graph, and make empty caches. It knows no requests and no schedule (as vLLM v1's model runner: the
engine decides what runs, the runner runs it), so the engine never calls back into the VisionLanguageModel,
and a prompt goes through the same code whether the engine or the facade's `prefill` runs it.
"""
from __future__ import annotations

import threading

import numpy as np

from vlm_core.runtime.engine import decoder_call, memory_hints
from vlm_core.runtime.engine.kv_buffer import KVCache
from vlm_core.runtime.engine.kv_slots import BatchKVCache


class ModelRunner:
    """Sessions, embeddings and KV geometry of one loaded model folder.

    Args:
        family: the model family's Family (feeds, vision splits, output axes).
        sessions: {"decoder", "vision", optionally "prefill"} ONNX Runtime sessions.
        embeddings: the token-embedding table [vocab, H] (memory-mapped); embedding_scale: per-token scales or None.
        text_config: the manifest's TextConfig (layers, kv heads, head_dim, context, kv_dtype).
        quantization: the manifest's quantization method ("none", "int8", "int4", "mixed"): decode_plan.py.
        vision_files: the real paths of the vision graph's files, whose mapped pages are marked cold after each
            vision call (memory_hints.py).
    """

    def __init__(self, family, sessions: dict, embeddings, embedding_scale, text_config, quantization: str = "none",
                 vision_files: frozenset = frozenset()):
        self.family, self.sessions = family, sessions
        self.vision_files = vision_files
        self.embeddings, self.embedding_scale = embeddings, embedding_scale
        self.num_layers, self.num_kv_heads = text_config.num_layers, text_config.num_kv_heads
        self.head_dim, self.max_context = text_config.head_dim, text_config.max_context
        self.kv_dtype = np.dtype(text_config.kv_dtype)  # the decoder graph's past/present I/O
        self.quantization = quantization
        # the decode step's binding, kept between steps (engines sharing this runner take turns)
        self._decode_binding = decoder_call.BoundDecoder(sessions["decoder"])
        self._decode_lock = threading.Lock()
        # a format_version 3 decoder returns every position's logits when asked: what jump-forward needs
        self.gives_all_positions = decoder_call.gives_all_positions(sessions["decoder"])

    @property
    def bytes_per_slot(self) -> int:
        """KV bytes of one token, all layers, keys and values."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_dtype.itemsize

    # --- inputs and caches ------------------------------------------------------------------------
    def embed(self, token_ids) -> np.ndarray:
        """Token ids [S] -> float32 [S, H], from the memory-mapped table."""
        ids = np.asarray(token_ids, dtype=np.int64)
        rows = np.asarray(self.embeddings[ids], dtype=np.float32)
        if self.embedding_scale is not None:
            rows *= np.asarray(self.embedding_scale[ids], dtype=np.float32)
        return rows

    def new_cache(self, expected_length: int) -> KVCache:
        """An empty KV cache for one sequence of at most `expected_length` tokens."""
        return KVCache(self.num_layers, self.num_kv_heads, self.head_dim, self.max_context,
                       dtype=self.kv_dtype, expected_length=expected_length)

    def new_batch(self) -> BatchKVCache:
        """An empty KV cache for the rows decoded together."""
        return BatchKVCache(self.num_layers, self.num_kv_heads, self.head_dim, self.max_context, dtype=self.kv_dtype)

    # --- the decoder ------------------------------------------------------------------------------
    def run_decoder(self, feeds: dict, cache: KVCache) -> np.ndarray:
        """One batch-1 decoder call on `feeds` (the family's inputs) over `cache`, which takes the new tokens
        in place; returns the last position's logits [vocab]."""
        new_tokens = feeds["inputs_embeds"].shape[1]
        cache.reserve(cache.offset + new_tokens)
        logits = self.prefill_row(feeds, cache.keys, cache.values, cache.offset + new_tokens)
        cache.advance(new_tokens)
        return logits

    def prefill_row(self, feeds: dict, keys: list, values: list, length_after: int) -> np.ndarray:
        """Prompt tokens of one sequence through the decoder, written in after its filled slots: `keys` /
        `values` are its row's buffers (a KVCache's, or a batch row's views BatchKVCache.buffers(r, r + 1)) with
        room for `length_after` slots; returns the last position's logits [vocab]."""
        new_tokens = feeds["inputs_embeds"].shape[1]
        # A "prefill" graph (same I/O, weights for GEMMs) takes multi-token runs when the export made one.
        session = self.sessions["prefill"] if new_tokens > 1 and "prefill" in self.sessions else self.sessions["decoder"]
        return decoder_call.run_decoder(session, feeds, keys, values, [length_after])[0]

    def decode(self, feeds: dict, keys: list, values: list, lengths_after, buffers_key=None) -> np.ndarray:
        """One decoder call for one new token in each of several rows (views of a BatchKVCache's buffers);
        returns logits [rows, vocab]. `buffers_key` changes whenever the views do (the batch's layout and the
        rows): the binding is then made again, else reused (decoder_call.BoundDecoder)."""
        with self._decode_lock:
            return self._decode_binding.run(feeds, keys, values, lengths_after, buffers_key)

    def run_chunk(self, feeds: dict, keys: list, values: list, length_after: int) -> np.ndarray:
        """Several new tokens of one batch row (views of its buffers: BatchKVCache.buffers(r, r + 1)) through
        the decoder, written in after the row's filled slots; returns every position's logits [S, vocab]
        (jump-forward: engine/jump_forward.py). The decode graph runs it: a few tokens are GEMVs still."""
        return decoder_call.run_decoder(self.sessions["decoder"], feeds, keys, values, [length_after],
                                        all_positions=True)[0]

    def release_decode_buffers(self) -> None:
        """Let the decode binding drop the KV buffers it holds (the batch emptied: its memory goes back)."""
        with self._decode_lock:
            self._decode_binding.release()

    def prefill(self, prompt, cache: KVCache, vision_outputs) -> np.ndarray:
        """The whole prompt (its images' `vision_outputs` spliced in, or None) through the decoder in one call
        over `cache`; returns the last position's logits [vocab]."""
        feeds = self.family.prefill_feeds(prompt, self.embed(prompt.input_ids), vision_outputs)
        return self.run_decoder(feeds, cache)

    # --- the vision graph -------------------------------------------------------------------------
    def encode(self, pixel_values: np.ndarray, media_grid) -> list:
        """One vision call on one image or piece of a clip: the vision graph's outputs."""
        outputs = self.sessions["vision"].run(None, self.family.vision_feeds(pixel_values, media_grid))
        memory_hints.after_vision(self.vision_files)  # under a memory limit the decoder's pages stay, not these
        return outputs

    def join_vision(self, per_item: list) -> list:
        """Vision outputs of consecutive images (or pieces of one clip) -> one set, joined along the family's axes."""
        return [np.concatenate([outputs[i] for outputs in per_item], axis=axis)
                for i, axis in enumerate(self.family.vision_output_axes)]

    def encode_images(self, prompt, patches_per_call: int):
        """Every image and clip of the prompt through the vision graph, each cut into pieces of at most
        `patches_per_call` patches where the family can (split_frames): their joined outputs, or None."""
        if prompt.pixel_values is None:
            return None
        family = self.family
        pieces = [piece for pixels, grid in family.split_images(prompt.pixel_values, prompt.media_grid)
                  for piece in family.split_frames(pixels, grid, patches_per_call)]
        return self.join_vision([self.encode(pixels, grid) for pixels, grid in pieces])
