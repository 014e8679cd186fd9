"""Video parity: clips written here with PyAV from real photographs (panned and zoomed, so frames differ),
run by our runtime on the exported tiny Qwen3-VL, against transformers' eager model given the same
`pixel_values_videos`, `video_grid_thw` and prompt: 24 greedy tokens equal, first-step logits close, M-RoPE
positions equal `get_rope_index`. (Pixel values and prompt ids against transformers' own processors:
tests/test_video_preprocess.py and test_video_prompt_ids_equal_the_processors below.)"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vlm_core.export.parity import relative_error
from vlm_core.kernels.sampling import SamplingParams

av = pytest.importorskip("av", reason="video decoding needs PyAV (the `video` extra; in the test extra)")

NEW_TOKENS = 24
LOGITS_RTOL = 1e-4


def write_clip(path: str, photo: np.ndarray, frames: int, size: tuple, fps: int = 6, zoom: float = 0.5) -> str:
    """An H.264 clip of `frames` frames of `size` (w, h): a window over `photo` panning right and zooming in."""
    from PIL import Image

    width, height = size
    picture = Image.fromarray(photo)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            scale = 1 - zoom * i / max(frames - 1, 1)
            w, h = int(picture.width * scale * 0.8), int(picture.height * scale * 0.8)
            left = int((picture.width - w) * i / max(frames - 1, 1))
            top = (picture.height - h) // 2
            frame = picture.crop((left, top, left + w, top + h)).resize((width, height))
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> dict:
    from skimage import data

    folder = tmp_path_factory.mktemp("clips")
    return {"astronaut": write_clip(str(folder / "astronaut.mp4"), data.astronaut(), 12, (96, 64)),
            "coffee": write_clip(str(folder / "coffee.mp4"), data.coffee(), 9, (64, 80), fps=4)}


def _messages(kind: str, clips: dict, photos: dict) -> list:
    video = {"type": "video", "video": clips["astronaut"]}
    text = {"type": "text", "text": "What happens in this video?"}
    if kind == "clip":
        parts = [video, text]
    elif kind == "clip_and_image":
        parts = [{"type": "image", "path": photos["coffee"]}, video, text]
    else:  # two clips
        parts = [video, {"type": "video", "path": clips["coffee"]}, {"type": "text", "text": "Compare them."}]
    return [{"role": "user", "content": parts}]


def transformers_inputs(prompt, family) -> dict:
    """Our prompt's arrays under transformers' names: images and clips apart, token types 0/1/2."""
    arrays = prompt.dump()
    inputs = {"input_ids": torch.from_numpy(arrays["input_ids"]),
              "attention_mask": torch.ones_like(torch.from_numpy(arrays["input_ids"]))}
    for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if grid in arrays and len(arrays[grid]):
            inputs[pixels] = torch.from_numpy(arrays[pixels])
            inputs[grid] = torch.from_numpy(arrays[grid])
    types = np.zeros_like(arrays["input_ids"])
    types[arrays["input_ids"] == family.image_token_id] = 1
    types[arrays["input_ids"] == family.video_token_id] = 2
    inputs["mm_token_type_ids"] = torch.from_numpy(types)
    return inputs


@pytest.mark.parametrize("kind", ["clip", "clip_and_image", "two_clips"])
def test_greedy_tokens_and_positions_match_transformers(kind, clips, photos, vlm, hf_model):
    prompt = vlm.prepare(_messages(kind, clips, photos))
    kinds = prompt.media_kinds
    assert kinds.count("video") == (2 if kind == "two_clips" else 1)
    assert (prompt.media_grid[np.array(kinds) == "video", 0] >= 2).all()  # several frame groups per clip
    inputs = transformers_inputs(prompt, vlm.family)

    with torch.no_grad():
        positions, delta = hf_model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], inputs.get("image_grid_thw"),
            inputs.get("video_grid_thw"))
        reference_logits = hf_model(**inputs).logits[0, -1].numpy()
        generated = hf_model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    np.testing.assert_array_equal(prompt.position_ids, positions[:, 0].numpy())
    assert prompt.rope_delta == int(delta)

    assert relative_error(vlm.prefill(prompt), reference_logits) < LOGITS_RTOL
    result = vlm.generate(prompt, SamplingParams(greedy=True), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    assert result.token_ids == generated[0, inputs["input_ids"].shape[1]:].tolist()


def test_clip_encoded_in_pieces_equals_one_call(clips, photos, vlm):
    """The engine encodes a long clip a few frame groups per vision call; the features equal one call's."""
    prompt = vlm.prepare(_messages("clip", clips, photos))
    feeds = vlm.family.vision_feeds(prompt.pixel_values, prompt.media_grid)
    whole = vlm.sessions["vision"].run(None, feeds)
    t, h, w = prompt.media_grid[0]
    pieces = vlm.family.split_frames(prompt.pixel_values, prompt.media_grid[0], h * w)  # one group per call
    assert len(pieces) == t
    parts = [vlm.sessions["vision"].run(None, vlm.family.vision_feeds(p, g)) for p, g in pieces]
    for i, axis in enumerate(vlm.family.vision_output_axes):
        np.testing.assert_allclose(np.concatenate([part[i] for part in parts], axis=axis), whole[i],
                                   rtol=1e-5, atol=1e-6)


def test_batched_clip_answers_equal_alone(clips, photos, vlm):
    """A clip request decoded next to an image request and a text one gives the tokens it gets alone."""
    requests = [_messages("clip", clips, photos), _messages("two_clips", clips, photos),
                [{"role": "user", "content": "Hello"}]]
    alone = [vlm.generate(m, SamplingParams(greedy=True), max_new_tokens=8, min_new_tokens=8).token_ids
             for m in requests]
    together = vlm.generate_batch(requests, SamplingParams(greedy=True), max_new_tokens=8, min_new_tokens=8)
    assert [r.token_ids for r in together] == alone


def test_same_clip_again_is_not_encoded_again(clips, photos, vlm):
    messages = _messages("clip", clips, photos)
    vlm.generate(messages, SamplingParams(greedy=True), max_new_tokens=2)
    before = vlm.engine.counters["vision_images"]
    again = vlm.generate(messages, SamplingParams(greedy=True), max_new_tokens=2)
    assert vlm.engine.counters["vision_images"] == before
    assert again.cached_tokens > 0


@pytest.fixture(scope="module")
def hf_video_processor(qwen_checkpoint):
    """transformers' whole Qwen3VLProcessor on the checkpoint (PIL image processor, the video processor run
    through tests/torchvision_shim.py): it reads the clip files itself."""
    import json
    import os

    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
        Qwen3VLVideoProcessor,
    )

    from tests.torchvision_shim import torchvision_shim

    def config(name):
        with open(os.path.join(qwen_checkpoint, name)) as f:
            return json.load(f)

    keep = ("size", "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
    image_processor = Qwen2VLImageProcessorPil(**{k: config("preprocessor_config.json")[k] for k in keep})
    video_config = {k: v for k, v in config("video_preprocessor_config.json").items()
                    if k not in ("processor_class", "video_processor_type")}
    class Qwen3VLProcessorNamedVideo(transformers.Qwen3VLProcessor):
        # Without torchvision transformers' video-processor registry is empty: name the class explicitly.
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and isinstance(argument, Qwen3VLVideoProcessor):
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    class Qwen3VLVideoProcessorPyAV(Qwen3VLVideoProcessor):
        # Its default decoder is torchcodec (not installed); transformers' own PyAV loader reads the files.
        def fetch_videos(self, video_url_or_urls, sample_indices_fn=None):
            from transformers.video_utils import load_video

            if isinstance(video_url_or_urls, list):
                return list(zip(*[self.fetch_videos(x, sample_indices_fn) for x in video_url_or_urls]))
            return load_video(video_url_or_urls, backend="pyav", sample_indices_fn=sample_indices_fn)

    with torchvision_shim():
        video_processor = Qwen3VLVideoProcessorPyAV(cap_pixels_per_frame=False, **video_config)
        with open(os.path.join(qwen_checkpoint, "chat_template.jinja")) as f:
            template = f.read()
        yield Qwen3VLProcessorNamedVideo(image_processor=image_processor, video_processor=video_processor,
                                            tokenizer=transformers.AutoTokenizer.from_pretrained(qwen_checkpoint),
                                            chat_template=template)


@pytest.mark.parametrize("kind", ["clip", "clip_and_image", "two_clips"])
def test_video_prompt_ids_equal_the_processors(kind, clips, photos, vlm, hf_video_processor):
    """Prompt token ids (timestamps, per-group vision start/end, pad runs), pixel values and grids equal what
    transformers' processor makes from the same files with `apply_chat_template(..., tokenize=True)`."""
    messages = _messages(kind, clips, photos)
    inputs = hf_video_processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                    return_dict=True, return_tensors="np")
    prompt = vlm.prepare(messages)
    arrays = prompt.dump()
    np.testing.assert_array_equal(arrays["input_ids"], inputs["input_ids"])
    np.testing.assert_array_equal(arrays["video_grid_thw"], inputs["video_grid_thw"])
    np.testing.assert_array_equal(arrays["pixel_values_videos"], inputs["pixel_values_videos"])
    if kind == "clip_and_image":
        np.testing.assert_array_equal(arrays["pixel_values"], inputs["pixel_values"])
    assert "seconds>" in vlm.tokenizer.decode(prompt.input_ids.tolist(), skip_special_tokens=False)


def test_clip_too_long_for_the_context_is_refused_before_decoding(clips, photos, vlm, monkeypatch):
    """The clip's frame count and size come from the container's header: a clip that cannot fit the context
    with max_new_tokens is refused (naming the budget) before any frame is decoded, and nothing is queued."""
    import vlm_core.models.qwen3_vl
    from vlm_core.kernels.video import VideoTooLong

    def no_decoding(*args, **kwargs):
        raise AssertionError("a frame was decoded")

    monkeypatch.setattr(vlm_core.models.qwen3_vl, "load_video", no_decoding)  # the name the family decodes with
    before = dict(vlm.engine.counters)
    with pytest.raises(VideoTooLong, match=r"astronaut\.mp4: \d+ frames of 96x64 need about \d+ prompt tokens.*"
                                            r"max_frames.*max_new_tokens"):
        vlm.generate(_messages("clip", clips, photos), max_new_tokens=vlm.max_context - 8)
    with pytest.raises(ValueError, match="video"):  # a bad budget names the parameter
        vlm.generate(_messages("clip", clips, photos), video={"fps": 0})
    assert vlm.engine.counters == before
