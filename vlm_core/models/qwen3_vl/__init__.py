"""Qwen3-VL (2B/4B/8B): prompt layout, image inputs, M-RoPE positions and deepstack splicing.

Torch-free. The runtime talks to a family only through `Family`; see runtime/model.py.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from vlm_core.kernels.grounding import GROUNDING_SCALE
from vlm_core.kernels.video import (
    VideoError,
    VideoTooLong,
    describe_video,
    load_video,
    probe_video,
)
from vlm_core.models.contract import FamilyBase
from vlm_core.models.media import MediaInputs, VideoOptions, VideoPart
from vlm_core.models.qwen3_vl import positions
from vlm_core.models.qwen3_vl.config import Qwen3VLVisionConfig
from vlm_core.models.qwen3_vl.preprocess import (
    ImageProcessorParams,
    check_pixel_budget,
    fit_pixel_budget,
    preprocess_images,
)
from vlm_core.models.qwen3_vl.prompt import expand_media_pads, tokenize_prompt
from vlm_core.models.qwen3_vl.video import (
    VideoProcessorParams,
    frame_timestamps,
    preprocess_video,
    sample_frame_indices,
    video_grid,
)

NAME = "qwen3_vl"


@dataclass
class PreparedPrompt:
    """Everything the graphs need for one prompt, in the model's own input names."""

    input_ids: np.ndarray  # int64 [S]
    # Images and clips in prompt order (the vision graph reads both the same way; a clip's t > 1):
    pixel_values: np.ndarray | None  # float32 [n_patches, C*T*P*P]
    media_grid: np.ndarray | None  # int64 [n_items, 3]: (t, h, w) patches per item (transformers' image_grid_thw)
    position_ids: np.ndarray  # int64 [3, S]
    rope_delta: int
    image_tokens: int = 0  # prompt tokens taken by images and clips
    media_kinds: tuple = ()  # "image" / "video" per row of media_grid; () means all images

    def dump(self) -> dict:
        """The model inputs as arrays, for --dump-inputs (transformers' names: videos apart from images)."""
        arrays = {"input_ids": self.input_ids[None], "position_ids": self.position_ids[:, None]}
        kinds = self.media_kinds or ("image",) * (0 if self.media_grid is None else len(self.media_grid))
        for kind, pixels_name, grid_name in (("image", "pixel_values", "image_grid_thw"),
                                             ("video", "pixel_values_videos", "video_grid_thw")):
            rows = [i for i, k in enumerate(kinds) if k == kind]
            if not rows and kind == "video":
                continue
            grid = self.media_grid[rows] if rows else np.zeros((0, 3), np.int64)
            starts = np.concatenate([[0], np.cumsum(self.media_grid.prod(-1))]) if rows else []
            pixels = [self.pixel_values[starts[i]:starts[i + 1]] for i in rows]
            arrays[pixels_name] = np.concatenate(pixels) if pixels else np.zeros((0, 0), np.float32)
            arrays[grid_name] = grid
        return arrays


class Family(FamilyBase):
    """Qwen3-VL's serve-time behaviour, configured from manifest.json (the contract: models/contract.py)."""

    name = NAME
    # Decoder inputs -> (batch axis, sequence axis): the engine slices prompts into chunks along the
    # sequence axis and stacks one decode row per sequence along the batch axis.
    decoder_feed_axes = {"inputs_embeds": (0, 1), "position_ids": (1, 2), "deepstack_embeds": (1, 2)}
    # Vision outputs -> the axis along which one image's rows follow another's.
    vision_output_axes = (0, 1)  # image_embeds [n, H], deepstack_embeds [K, n, H]
    # Answers to "locate"/"detect"/"point" prompts hold bbox_2d / point_2d JSON relative to the image, 0..1000
    # (kernels/grounding.py gives the sources); the engine turns them into pixels (GenerationResult.boxes).
    grounding_scale = GROUNDING_SCALE
    reads_video = True  # video parts (models.media.VideoPart) become clips

    def __init__(self, manifest: dict):
        super().__init__(manifest)
        self.vision_config = Qwen3VLVisionConfig.from_dict(manifest["vision_config"])
        self.image_params = ImageProcessorParams.from_dict(manifest["preprocessing"])
        self.merge_size = int(self.vision_config.spatial_merge_size)
        self.video_token_id = int(self.tokens["video_token_id"])
        # The clip preprocessing (the checkpoint's video_preprocessor_config.json); an export made before video
        # support gets what transformers falls back to without one: the image config's size, mean and std
        # with the video processor's other defaults.
        video = manifest.get("video_preprocessing")
        self.video_params = (VideoProcessorParams.from_dict(video) if video is not None else
                             VideoProcessorParams.from_image_params(manifest["preprocessing"],
                                                                   asdict(self.vision_config)))

    # --- images and clips -----------------------------------------------------------------------
    def preprocess(self, sources, min_pixels=None, max_pixels=None, video: VideoOptions | None = None,
                   token_limit: int | None = None) -> MediaInputs:
        """Images (paths, bytes or PIL) and clips (models.media.VideoPart) in prompt order -> MediaInputs.

        `min_pixels` / `max_pixels` bound each image; `video` is the clips' budget. Every clip is probed
        first: when the clips alone would take more than `token_limit` prompt tokens, VideoError is raised
        before any frame is decoded (where the container tells its frame count)."""
        sources = list(sources)
        if any(not isinstance(s, VideoPart) for s in sources):
            self.check_pixel_budget(min_pixels, max_pixels)
        clips = [s.source for s in sources if isinstance(s, VideoPart)]
        plans = self._plan_clips(clips, video or VideoOptions(), token_limit) if clips else []
        pixels, grids, kinds, stamps = [], [], [], []
        plans = iter(plans)
        for source in sources:
            if isinstance(source, VideoPart):
                pixel_values, grid, timestamps = self._read_clip(source.source, next(plans), video or VideoOptions())
                kinds.append("video")
                stamps.append(timestamps)
            else:
                pixel_values, grid = preprocess_images([source], self.image_params, min_pixels=min_pixels,
                                                       max_pixels=max_pixels)
                kinds.append("image")
                stamps.append(None)
            pixels.append(pixel_values)
            grids.append(grid)
        return MediaInputs(np.concatenate(pixels), np.concatenate(grids).astype(np.int64), tuple(kinds), stamps)

    def check_pixel_budget(self, min_pixels=None, max_pixels=None, names: dict | None = None) -> None:
        """Refuse image pixel bounds that cannot work (preprocess.check_pixel_budget: at least one image token, at
        most the context's worth, min <= max); `names` spells them as the caller does."""
        check_pixel_budget(self.image_params, min_pixels, max_pixels, self.text_config.max_context, names)

    def fit_image_budget(self, sizes: list, token_limit: int, min_pixels=None) -> int | None:
        """The largest max_pixels (in whole (patch x merge)² tokens) under which images of `sizes` take at most
        `token_limit` tokens, or None when the checkpoint's max_pixels fits them (preprocess.fit_pixel_budget);
        at most the context's worth, so that it passes check_pixel_budget (fewer pixels fit all the more)."""
        budget = fit_pixel_budget(self.image_params, sizes, token_limit, min_pixels)
        factor = self.image_params.patch_size * self.image_params.merge_size
        return None if budget is None else min(budget, self.text_config.max_context * factor * factor)

    def _plan_clips(self, clips: list, options: VideoOptions, token_limit: int | None) -> list:
        """Probe every clip (no frame decoded): [(info, frame indices)], refusing clips past `token_limit`."""
        params, plans, total = self.video_params, [], 0
        for clip in clips:
            info = probe_video(clip)
            indices = sample_frame_indices(info, params, fps=options.fps, max_frames=options.max_frames)
            plans.append((info, indices))
            if info.total_frames > 0:
                try:
                    _, _, grid = video_grid(len(indices), info.height, info.width, params,
                                            max_pixels=options.max_pixels)
                except VideoError as e:  # too few frames, an extreme aspect ratio: say which clip
                    raise VideoError(f"{describe_video(clip)}: {e}") from None
                t, h, w = (int(v) for v in np.asarray(grid).reshape(3))
                # each frame group: its pads, vision start/end and a "<x.x seconds>" of at least 4 tokens
                total += t * (h * w // self.merge_size ** 2 + 6)
                if token_limit is not None and total > token_limit:
                    raise VideoTooLong(describe_video(clip), len(indices), info.width, info.height, total, token_limit)
        return plans

    def _read_clip(self, clip, plan, options: VideoOptions):
        """Decode the planned frames of one clip -> (pixel_values, video_grid_thw [1, 3], timestamps)."""
        params = self.video_params
        _, indices = plan
        loaded = load_video(clip, lambda info: indices)
        pixel_values, grid = preprocess_video(loaded.frames, params, max_pixels=options.max_pixels)
        fps = loaded.fps if loaded.fps else 24  # what transformers assumes when the source has no frame rate
        return pixel_values, grid, frame_timestamps(loaded.frame_indices, fps, params.temporal_patch_size)

    def vision_feeds(self, pixel_values: np.ndarray, media_grid: np.ndarray) -> dict:
        """Inputs of the vision graph for a batch of images (all grid-dependent tables in NumPy)."""
        feeds = positions.vision_inputs(media_grid, int(self.vision_config.num_position_embeddings),
                                        self.merge_size)
        feeds["pixel_values"] = pixel_values.astype(np.float32, copy=False)
        return feeds

    def split_images(self, pixel_values: np.ndarray, media_grid: np.ndarray) -> list:
        """A prompt's image arrays -> [(pixel_values, media_grid)] one pair per image, in order."""
        counts = np.asarray(media_grid).prod(-1)
        starts = np.concatenate([[0], np.cumsum(counts)])
        return [(pixel_values[starts[i]:starts[i + 1]], media_grid[i:i + 1]) for i in range(len(counts))]

    def split_frames(self, pixel_values: np.ndarray, grid_thw: np.ndarray, max_patches: int) -> list:
        """One image or clip -> [(pixel_values, grid)] pieces of whole frame groups, each at most `max_patches`
        patches (at least one group): the vision graph gives the same features piece by piece, since each
        frame group attends only to itself."""
        t, h, w = (int(v) for v in np.asarray(grid_thw).reshape(3))
        per_call = max(1, max_patches // (h * w))
        if t <= per_call:
            return [(pixel_values, np.asarray(grid_thw).reshape(1, 3))]
        return [(pixel_values[first * h * w:min(first + per_call, t) * h * w],
                 np.array([[min(per_call, t - first), h, w]], dtype=np.int64)) for first in range(0, t, per_call)]

    def image_token_counts(self, media_grid: np.ndarray) -> list:
        """Prompt tokens each image or clip occupies (its merged patches), in order."""
        return [int(n) // self.merge_size ** 2 for n in np.asarray(media_grid).prod(-1)]

    def media_token_mask(self, input_ids: np.ndarray) -> np.ndarray:
        """Which prompt tokens take image or clip features (in prompt order, item after item)."""
        return np.isin(input_ids, (self.image_token_id, self.video_token_id))

    # --- prompt ---------------------------------------------------------------------------------
    def prepare(self, input_ids: np.ndarray, pixel_values=None, media_grid=None, media_kinds=()) -> PreparedPrompt:
        """Token ids (pads already expanded) + image/clip arrays in prompt order (`media_kinds` says which
        rows are clips; () means all images) -> PreparedPrompt with M-RoPE positions."""
        input_ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
        media = MediaInputs(pixel_values, np.zeros((0, 3), np.int64) if media_grid is None else
                            np.asarray(media_grid, dtype=np.int64), tuple(media_kinds))
        if not media.kinds:
            media.kinds = ("image",) * len(media.grid_thw)
        for kind, token_id in (("image", self.image_token_id), ("video", self.video_token_id)):
            grid = media.of_kind(kind)
            n_pads = int((input_ids == token_id).sum())
            expected = 0 if grid is None else int(grid.prod(-1).sum()) // self.merge_size ** 2
            if n_pads != expected:
                raise ValueError(f"the prompt holds {n_pads} {kind} tokens but the {kind}s need {expected}")
        position_ids, delta = positions.get_rope_index(input_ids, media.of_kind("image"), self.image_token_id,
                                                       self.merge_size, media.of_kind("video"), self.video_token_id)
        n_media = int(self.media_token_mask(input_ids).sum())
        kinds = media.kinds if "video" in media.kinds else ()
        return PreparedPrompt(input_ids, pixel_values, media_grid, position_ids, delta, n_media, kinds)

    # --- decoder feeds --------------------------------------------------------------------------
    def prefill_feeds(self, prompt: PreparedPrompt, token_embeds: np.ndarray, vision_outputs) -> dict:
        """Decoder inputs for the whole prompt (batch 1), images spliced in at their pad tokens.

        token_embeds: float32 [S, H]; vision_outputs: (image_embeds [n, H], deepstack [K, n, H]) or None.
        """
        seq, hidden = token_embeds.shape
        num_deepstack = int(self.text_config.num_deepstack)
        inputs_embeds = np.array(token_embeds, dtype=np.float32)
        # Without images the deepstack input is zeros: one row broadcast (no memory), each prompt chunk's
        # slice made real only for its own call, not [K, 1, S, H] floats for the whole prompt.
        deepstack = np.broadcast_to(np.zeros((num_deepstack, 1, 1, hidden), dtype=np.float32),
                                    (num_deepstack, 1, seq, hidden))
        if vision_outputs is not None:
            deepstack = np.zeros((num_deepstack, 1, seq, hidden), dtype=np.float32)
            image_embeds, deepstack_embeds = vision_outputs
            is_media = self.media_token_mask(prompt.input_ids)  # images and clips, in prompt order
            inputs_embeds[is_media] = image_embeds
            deepstack[:, 0, is_media] = deepstack_embeds
        return {"inputs_embeds": inputs_embeds[None], "position_ids": prompt.position_ids[:, None],
                "deepstack_embeds": deepstack}

    def decode_feeds(self, prompt: PreparedPrompt, token_embed: np.ndarray, cache_position: int) -> dict:
        """Decoder inputs for new text tokens after the prompt, the first at cache position `cache_position`
        (0-based): token_embed [H] (one token) or [S, H] (a run, e.g. jump-forward's forced tokens)."""
        hidden = token_embed.shape[-1]
        embeds = token_embed.reshape(1, -1, hidden).astype(np.float32, copy=False)
        seq = embeds.shape[1]
        # text after the prompt: the three M-RoPE axes share one position, rope_delta past the cache slot
        positions = np.arange(seq, dtype=np.int64) + (cache_position + prompt.rope_delta)
        num_deepstack = int(self.text_config.num_deepstack)
        return {"inputs_embeds": embeds, "position_ids": np.broadcast_to(positions, (3, 1, seq)),
                "deepstack_embeds": np.zeros((num_deepstack, 1, seq, hidden), dtype=np.float32)}

    def decode_rows_feeds(self, prompts: list, token_embeds: np.ndarray, cache_positions) -> dict:
        """One decode step's inputs for every row at once (FamilyBase.decode_rows_feeds): each row's M-RoPE
        position is its cache position past its prompt's rope_delta, on all three axes."""
        rows, hidden = token_embeds.shape
        positions = np.asarray(cache_positions, np.int64) + np.array([p.rope_delta for p in prompts], np.int64)
        return {"inputs_embeds": np.asarray(token_embeds, np.float32)[:, None],
                "position_ids": np.broadcast_to(positions[None, :, None], (3, rows, 1)),
                "deepstack_embeds": np.zeros((int(self.text_config.num_deepstack), rows, 1, hidden), np.float32)}

    def tokenize(self, tokenizer, text: str, media: MediaInputs | None) -> np.ndarray:
        """Rendered prompt text -> int64 token ids, each image pad expanded to its token run and each video
        pad to its clip's timestamped frame groups."""
        text = expand_media_pads(text, media or MediaInputs(None, np.zeros((0, 3), np.int64)), self.merge_size)
        return tokenize_prompt(tokenizer, text)
