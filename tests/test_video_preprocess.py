"""Video decoding (kernels/video.py) and Qwen3-VL video preprocessing (models/qwen3_vl/video.py) against
transformers: its PyAV loader (`read_video_pyav`) for frames, `Qwen3VLVideoProcessor` for frame indices,
sizes, grids and pixel values, and `Qwen3VLProcessor._calculate_timestamps` for timestamps.

Clips are written here with PyAV from real photographs (scikit-image), panned and zoomed so that every
frame differs. transformers is the reference, never our own numbers.
"""
from __future__ import annotations

import base64
import functools
import io
import os
import pathlib
import sys
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

av = pytest.importorskip("av", reason="PyAV is in the test extra (pip install 'vlm-core[test]')")
torch = pytest.importorskip("torch")
skimage_data = pytest.importorskip("skimage.data")

from tests.torchvision_shim import torchvision_shim  # noqa: E402
from vlm_core.kernels.bicubic import resize_frames  # noqa: E402
from vlm_core.kernels.video import (  # noqa: E402
    MAX_FRAME_PIXELS,
    VideoError,
    VideoInfo,
    describe_video,
    load_video,
    probe_video,
)
from vlm_core.models.qwen3_vl.video import (  # noqa: E402
    VideoProcessorParams,
    frame_timestamps,
    preprocess_video,
    sample_frame_indices,
    video_grid,
)

# Qwen3-VL-2B-Instruct's video_preprocessor_config.json.
QWEN3_VL_2B = {"size": {"longest_edge": 25165824, "shortest_edge": 4096}, "patch_size": 16,
               "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
               "image_std": [0.5, 0.5, 0.5], "fps": 2, "processor_class": "Qwen3VLProcessor",
               "video_processor_type": "Qwen3VLVideoProcessor"}


@pytest.fixture(scope="module")
def processor_class():
    """transformers' Qwen3VLVideoProcessor with the torchvision shim installed where it is looked up."""
    import transformers.models.qwen3_vl.video_processing_qwen3_vl as qwen3_video

    with torchvision_shim():
        yield qwen3_video.Qwen3VLVideoProcessor


def make_processor(processor_class, config: dict = QWEN3_VL_2B, **overrides):
    kwargs = {k: v for k, v in config.items() if k not in ("processor_class", "video_processor_type")}
    kwargs.setdefault("cap_pixels_per_frame", False)
    kwargs.update(overrides)
    return processor_class(**kwargs)


def params_of(processor) -> VideoProcessorParams:
    return VideoProcessorParams.from_dict(processor.to_dict())


# --- clips made from photographs ---------------------------------------------------------------------

def photo_frames(count: int, height: int, width: int) -> np.ndarray:
    """uint8 [count, height, width, 3]: windows panning and zooming across three photographs."""
    photos = [skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea()]
    frames = []
    for t in range(count):
        photo = photos[(t // 10) % 3]
        zoom = 1.0 - 0.03 * (t % 10)
        crop_h, crop_w = int(photo.shape[0] * 0.6 * zoom), int(photo.shape[1] * 0.6 * zoom)
        top, left = 4 * (t % 10), 7 * (t % 10)
        window = Image.fromarray(photo[top:top + crop_h, left:left + crop_w])
        frames.append(np.asarray(window.resize((width, height), Image.Resampling.BILINEAR)))
    return np.stack(frames)


def write_clip(path, frames: np.ndarray, fps, codec: str, pix_fmt: str) -> str:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("clips")
    return {
        # 30 frames at 10 fps, H.264 with B-frames (reordered decode)
        "mp4": write_clip(folder / "pan.mp4", photo_frames(30, 240, 320), 10, "libx264", "yuv420p"),
        # odd size and odd count, lossless FFV1 in Matroska, 7.5 fps
        "odd": write_clip(folder / "odd.avi", photo_frames(23, 151, 203), 7.5, "ffv1", "yuv444p"),
        # Matroska keeps no frame count in its header
        "mkv": write_clip(folder / "clip.mkv", photo_frames(23, 151, 203), 7.5, "ffv1", "yuv444p"),
        # MPEG-4 part 2 in AVI, 45 frames at 25 fps
        "avi": write_clip(folder / "clip.avi", photo_frames(45, 96, 128), 25, "mpeg4", "yuv420p"),
    }


def hf_read(path, sample):
    """transformers' PyAV loader: (frames uint8 [T, H, W, 3], VideoMetadata)."""
    from transformers.video_utils import read_video_pyav

    return read_video_pyav(path, sample_indices_fn=sample)


# --- resize --------------------------------------------------------------------------------------------

def test_resize_frames_is_torch_uint8_antialiased_bicubic():
    rng = np.random.default_rng(0)
    photo = np.ascontiguousarray(skimage_data.astronaut().transpose(2, 0, 1))  # [3, 512, 512]
    cases = [(240, 320, 256, 320), (240, 320, 64, 96), (512, 512, 33, 511), (151, 203, 160, 192),
             (37, 53, 640, 64), (512, 512, 512, 17), (2, 3, 5, 7)]
    cases += [tuple(int(v) for v in rng.integers(1, 300, 4)) for _ in range(40)]
    for height, width, new_height, new_width in cases:
        frames = np.stack([photo[:, :height, :width], rng.integers(0, 256, (3, height, width), dtype=np.uint8)])
        expected = torch.nn.functional.interpolate(torch.from_numpy(frames), size=(new_height, new_width),
                                                   mode="bicubic", antialias=True).numpy()
        np.testing.assert_array_equal(resize_frames(frames, new_height, new_width), expected,
                                      err_msg=f"{height}x{width} -> {new_height}x{new_width}")


# --- decoding ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mp4", "odd", "avi"])
def test_frames_equal_transformers_pyav_loader(processor_class, clips, kind):
    processor = make_processor(processor_class)
    for fps in (2, 5, 100):
        sample = functools.partial(processor.sample_frames, fps=fps)
        expected, metadata = hf_read(clips[kind], sample)
        info = probe_video(clips[kind])
        assert (info.total_frames, info.fps, info.height, info.width) == \
            (metadata.total_num_frames, metadata.fps, metadata.height, metadata.width)
        clip = load_video(clips[kind], lambda info, fps=fps: sample_frame_indices(info, params_of(processor), fps=fps))
        np.testing.assert_array_equal(clip.frame_indices, metadata.frames_indices)
        assert clip.frames.dtype == np.uint8 and clip.frames.shape == expected.shape
        np.testing.assert_array_equal(clip.frames, expected)
        assert clip.fps == metadata.fps and clip.total_frames == metadata.total_num_frames


def test_matroska_frame_count_from_duration(processor_class, clips):
    """Matroska stores no frame count: transformers' loader reads 0 frames and cannot sample (IndexError);
    we count duration x rate. The frames at the same indices are still the loader's."""
    info = probe_video(clips["mkv"])
    assert (info.total_frames, info.fps, info.height, info.width) == (23, 7.5, 151, 203)
    from transformers.video_utils import VideoMetadata

    processor = make_processor(processor_class)
    clip = load_video(clips["mkv"], lambda info: sample_frame_indices(info, params_of(processor)))
    np.testing.assert_array_equal(clip.frame_indices, processor.sample_frames(VideoMetadata(23, fps=7.5)))
    expected, metadata = hf_read(clips["mkv"], lambda metadata, **kwargs: clip.frame_indices)
    assert metadata.total_num_frames == 0
    np.testing.assert_array_equal(clip.frames, expected)


def test_raw_stream_without_frame_count_or_duration(tmp_path):
    """A raw H.264 stream has neither a frame count nor a duration, and cannot seek: its packets are counted
    (demuxed, not decoded) and the frames are FFmpeg's."""
    frames = photo_frames(14, 48, 64)
    path = tmp_path / "raw.h264"
    with av.open(str(path), "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0 and container.duration is None
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert probe_video(path).total_frames == 14
    clip = load_video(path.read_bytes(), lambda info: [0, 6, 13])
    np.testing.assert_array_equal(clip.frames, decoded[[0, 6, 13]])


def test_bytes_data_url_and_pathlike_match_path(clips):
    def choose(info):
        return np.array([0, 3, 9, 22])

    by_path = load_video(clips["mkv"], choose)
    with open(clips["mkv"], "rb") as f:
        data = f.read()
    url = "data:video/x-matroska;base64," + base64.b64encode(data).decode()
    for source in (data, bytearray(data), url, pathlib.Path(clips["mkv"])):
        clip = load_video(source, choose)
        np.testing.assert_array_equal(clip.frames, by_path.frames)
        np.testing.assert_array_equal(clip.frame_indices, by_path.frame_indices)
    assert describe_video(url).startswith("data: URL (") and len(describe_video(url)) < 40


def test_indices_in_any_order_with_repeats(clips):
    frames = load_video(clips["avi"], lambda info: np.arange(info.total_frames)).frames
    clip = load_video(clips["avi"], lambda info: np.array([7, 2, 7, 40]))
    np.testing.assert_array_equal(clip.frames, frames[[7, 2, 7, 40]])
    np.testing.assert_array_equal(clip.frame_indices, [7, 2, 7, 40])


def test_lying_frame_count_clamps_to_the_last_frame(clips, monkeypatch):
    import vlm_core.kernels.video as video

    real = load_video(clips["avi"], lambda info: np.arange(info.total_frames)).frames  # 45 frames
    probe = video._ContainerReader.probe

    def promise_more(self):
        info = probe(self)
        return VideoInfo(info.total_frames + 10, info.fps, info.height, info.width)

    monkeypatch.setattr(video._ContainerReader, "probe", promise_more)
    clip = load_video(clips["avi"], lambda info: np.linspace(0, info.total_frames - 1, 6).round().astype(int))
    assert probe_video(clips["avi"]).total_frames == 55
    np.testing.assert_array_equal(clip.frame_indices, [0, 11, 22, 32, 43, 44])  # 54 does not exist
    np.testing.assert_array_equal(clip.frames, real[[0, 11, 22, 32, 43, 44]])
    assert clip.total_frames == 45 and len(clip.frames) == 6


def test_decoding_stops_after_the_last_chosen_frame(clips, monkeypatch):
    seen = []
    real_decode = av.container.InputContainer.decode

    def counting_decode(self, *args, **kwargs):
        for frame in real_decode(self, *args, **kwargs):
            seen.append(frame)
            yield frame

    monkeypatch.setattr(av.container.InputContainer, "decode", counting_decode)
    load_video(clips["avi"], lambda info: np.array([0, 5]))
    assert len(seen) == 6


# --- animated GIF / WebP, frame folders, frame lists and arrays --------------------------------------

def test_animated_gif_matches_ffmpeg_decoding_and_its_durations(tmp_path, processor_class):
    frames = photo_frames(12, 72, 96)
    images = [Image.fromarray(f).quantize(256, dither=Image.Dither.NONE) for f in frames]
    gif = tmp_path / "pan.gif"
    images[0].save(gif, save_all=True, append_images=images[1:], duration=200, loop=0, disposal=1)
    info = probe_video(gif)
    assert (info.total_frames, info.fps, info.height, info.width) == (12, 5.0, 72, 96)
    processor = make_processor(processor_class)
    expected, metadata = hf_read(str(gif), functools.partial(processor.sample_frames, fps=4))  # FFmpeg's GIF decoder
    clip = load_video(gif, lambda info: sample_frame_indices(info, params_of(processor), fps=4))
    np.testing.assert_array_equal(clip.frame_indices, metadata.frames_indices)
    np.testing.assert_array_equal(clip.frames, expected)
    assert clip.fps == pytest.approx(metadata.fps)


def test_animated_webp_needs_no_pyav(tmp_path, monkeypatch):
    frames = photo_frames(6, 64, 80)
    webp = tmp_path / "pan.webp"
    Image.fromarray(frames[0]).save(webp, save_all=True, append_images=[Image.fromarray(f) for f in frames[1:]],
                                    duration=200, lossless=True)
    monkeypatch.setitem(sys.modules, "av", None)  # PyAV not installed
    info = probe_video(webp)
    assert (info.total_frames, info.fps, info.height, info.width) == (6, 5.0, 64, 80)
    clip = load_video(webp, lambda info: np.array([0, 2, 5]))
    np.testing.assert_array_equal(clip.frames, frames[[0, 2, 5]])  # lossless


def test_frame_folder_and_frame_lists(tmp_path, processor_class, monkeypatch):
    frames = photo_frames(13, 60, 84)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames):  # natural order: frame_2 before frame_10
        Image.fromarray(frame).save(folder / f"frame_{i}.png")
    (folder / "notes.txt").write_text("not a frame")
    monkeypatch.setitem(sys.modules, "av", None)  # frame folders need no PyAV
    processor = make_processor(processor_class)
    params = params_of(processor)
    info = probe_video(folder)
    assert (info.total_frames, info.fps, info.height, info.width) == (13, None, 60, 84)
    clip = load_video(folder, lambda info: sample_frame_indices(info, params))
    from transformers.video_utils import VideoMetadata

    expected = processor.sample_frames(VideoMetadata(total_num_frames=13, fps=None))  # assumes 24 fps
    np.testing.assert_array_equal(clip.frame_indices, expected)
    np.testing.assert_array_equal(clip.frames, frames[expected])
    assert clip.fps is None
    paths = [str(folder / f"frame_{i}.png") for i in range(13)]
    sources = (paths, [Image.fromarray(f) for f in frames], list(frames), tuple(frames), frames)
    for source in sources:
        other = load_video(source, lambda info: sample_frame_indices(info, params))
        np.testing.assert_array_equal(other.frames, clip.frames)
        assert probe_video(source) == info
    # the processor's pixels for these frames (fps unknown: timestamps at 24 fps, as transformers)
    hf = processor(videos=[clip.frames], do_sample_frames=False, return_tensors="pt")
    pixel_values, grid = preprocess_video(clip.frames, params)
    np.testing.assert_array_equal(pixel_values, hf["pixel_values_videos"].numpy())
    np.testing.assert_array_equal(grid, hf["video_grid_thw"].numpy())


# --- sampling, timestamps, sizes ---------------------------------------------------------------------

def test_sample_frame_indices_match_processor(processor_class):
    from transformers.video_utils import VideoMetadata

    for min_frames, max_frames in ((4, 768), (2, 9), (6, 20)):
        processor = make_processor(processor_class, min_frames=min_frames, max_frames=max_frames)
        params = params_of(processor)
        for total in (1, 2, 3, 5, 17, 30, 31, 101, 1000, 4321):
            for source_fps in (None, 7.5, 10, 23.976, 30, 60):
                for fps in (None, 0.5, 1, 2, 3.3, 30):
                    metadata = VideoMetadata(total_num_frames=total, fps=source_fps)
                    expected = processor.sample_frames(metadata, fps=fps)
                    got = sample_frame_indices(VideoInfo(total, source_fps, 10, 10), params, fps=fps)
                    np.testing.assert_array_equal(got, expected, err_msg=f"{total} {source_fps} {fps}")
                    assert got.dtype == np.int64
        # the per-request max_frames override is the processor built with that max_frames
        narrower = make_processor(processor_class, min_frames=min_frames, max_frames=5)
        expected = narrower.sample_frames(VideoMetadata(total_num_frames=300, fps=30), fps=2)
        np.testing.assert_array_equal(sample_frame_indices(VideoInfo(300, 30, 8, 8), params, max_frames=5), expected)


def test_frame_timestamps_match_processor():
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    rng = np.random.default_rng(1)
    for count in (1, 2, 3, 4, 7, 10, 33):
        indices = np.sort(rng.choice(500, count, replace=False))
        for fps in (7.5, 10, 23.976, 24, 30):
            for temporal in (1, 2, 3):
                expected = Qwen3VLProcessor._calculate_timestamps(None, indices.copy(), fps, temporal)
                assert frame_timestamps(indices, fps, temporal) == expected
    assert frame_timestamps([0, 24, 48], None, 2) == Qwen3VLProcessor._calculate_timestamps(None, [0, 24, 48], 24, 2)


@pytest.mark.parametrize("cap", [False, True])
def test_video_grid_matches_processor_smart_resize(processor_class, cap):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    processor = make_processor(processor_class, cap_pixels_per_frame=cap)
    params = params_of(processor)
    sizes = [(240, 320), (151, 203), (1080, 1920), (720, 1280), (20, 30), (31, 4000), (4000, 33), (64, 64), (8, 12)]
    for frames in (2, 3, 4, 5, 16, 64, 301, 768):
        for height, width in sizes:
            for max_pixels in (None, 12 * 64 * 64, 4096 * 2):
                budget = params.max_pixels if max_pixels is None else max_pixels
                kwargs = {"size": {"shortest_edge": params.min_pixels, "longest_edge": budget},
                          "cap_pixels_per_frame": cap}
                new_height, new_width, grid = video_grid(frames, height, width, params, max_pixels=max_pixels)
                if not cap:
                    assert (new_height, new_width) == smart_resize(frames, height, width, 2, 32, params.min_pixels,
                                                                   budget)
                assert grid[0] * grid[1] * grid[2] == processor.get_num_of_video_patches(frames, height, width, kwargs)
                assert (grid[1] * 16, grid[2] * 16) == (new_height, new_width) and grid[0] == -(-frames // 2)
    with pytest.raises(VideoError, match="at least 2 frames"):
        video_grid(1, 240, 320, params)


# --- pixel values ------------------------------------------------------------------------------------

PIXEL_CASES = [
    # (clip, processor config overrides, fps, max_pixels override)
    ("mp4", {}, 2, None),  # 6 frames, 240x320 -> 256x320 (upscaled rows)
    ("mp4", {}, 3, 6 * 96 * 128),  # 9 frames (odd: last repeated), squeezed under the budget
    ("odd", {}, 2, None),  # odd size, 6 frames
    ("odd", {"size": {"shortest_edge": 16 * 512 * 512, "longest_edge": 25165824}}, 1.1, None),  # below min_pixels
    ("avi", {"image_mean": [0.48145466, 0.4578275, 0.40821073],
             "image_std": [0.26862954, 0.26130258, 0.27577711]}, 4, None),  # CLIP's mean/std, 7 frames
    ("avi", {"cap_pixels_per_frame": True, "max_video_tokens": 12}, 10, None),  # qwen-vl-utils' per-frame cap
    ("mp4", {"size": {"shortest_edge": 4096, "longest_edge": 16 * 32 * 32}, "max_frames": 16}, 30, None),
]


@pytest.mark.parametrize("kind,overrides,fps,max_pixels", PIXEL_CASES)
def test_pixel_values_match_processor(processor_class, clips, kind, overrides, fps, max_pixels):
    processor = make_processor(processor_class, **overrides)
    params = params_of(processor)
    frames, metadata = hf_read(clips[kind], functools.partial(processor.sample_frames, fps=fps))
    call = {} if max_pixels is None else {"size": {"shortest_edge": params.min_pixels, "longest_edge": max_pixels}}
    expected = processor(videos=[frames], do_sample_frames=False, return_tensors="pt", **call)

    clip = load_video(clips[kind], lambda info: sample_frame_indices(info, params, fps=fps))
    pixel_values, grid = preprocess_video(clip.frames, params, max_pixels=max_pixels)
    assert pixel_values.dtype == np.float32 and grid.dtype == np.int64
    np.testing.assert_array_equal(grid, expected["video_grid_thw"].numpy())
    np.testing.assert_array_equal(pixel_values, expected["pixel_values_videos"].numpy())
    info = probe_video(clips[kind])
    assert grid[0].tolist() == list(video_grid(len(clip.frames), info.height, info.width, params, max_pixels)[2])
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    assert frame_timestamps(clip.frame_indices, clip.fps, params.temporal_patch_size) == \
        Qwen3VLProcessor._calculate_timestamps(None, metadata.frames_indices, metadata.fps, 2)


# --- params ----------------------------------------------------------------------------------------------

def test_params_from_dict_round_trip_and_defaults(processor_class):
    params = VideoProcessorParams.from_dict(QWEN3_VL_2B)
    assert (params.min_pixels, params.max_pixels, params.fps, params.patch_size) == (4096, 25165824, 2, 16)
    assert VideoProcessorParams.from_dict(params.to_dict()) == params
    assert params.to_dict()["size"] == {"shortest_edge": 4096, "longest_edge": 25165824}
    defaults = params_of(processor_class())  # transformers' class defaults = ours
    assert defaults == VideoProcessorParams()


def test_params_from_image_params_follow_transformers_fallback(processor_class, tmp_path):
    """A checkpoint without video_preprocessor_config.json: transformers' video processor reads the image
    config (preprocessor_config.json); geometry comes from the ViT, sampling keeps the class defaults."""
    import json

    from vlm_core.export.demo import PREPROCESSOR

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    loaded = processor_class.from_pretrained(str(tmp_path))
    vision = {"patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2}
    params = VideoProcessorParams.from_image_params(PREPROCESSOR, vision)
    assert params == VideoProcessorParams.from_dict({**loaded.to_dict(), "cap_pixels_per_frame": False})
    assert (params.min_pixels, params.max_pixels, params.fps, params.max_frames) == (65536, 16777216, 2, 768)


# --- errors: one clear line each -----------------------------------------------------------------

def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_missing_file_and_not_a_video(tmp_path):
    with pytest.raises(VideoError, match="video file not found") as e:
        probe_video(tmp_path / "nope.mp4")
    assert "nope.mp4" in _one_line(e)
    text = tmp_path / "notes.mp4"
    text.write_text("these are not the frames you are looking for\n" * 20)
    with pytest.raises(VideoError, match="not a video file") as e:
        load_video(text, lambda info: [0])
    assert "notes.mp4" in _one_line(e)
    with pytest.raises(VideoError, match="no video stream"):
        probe_video(_audio_only(tmp_path / "tone.wav"))
    with pytest.raises(VideoError, match="empty file"):
        (tmp_path / "empty.mp4").write_bytes(b"")
        probe_video(tmp_path / "empty.mp4")
    with pytest.raises(VideoError, match="unsupported video input"):
        probe_video(12)
    with pytest.raises(VideoError, match="invalid base64"):
        probe_video("data:video/mp4;base64,@@@")


def _audio_only(path) -> str:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def test_truncated_files(clips, tmp_path):
    data = open(clips["mp4"], "rb").read()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])  # the moov atom (index) is at the end: FFmpeg cannot open it
    with pytest.raises(VideoError, match="corrupt or truncated") as e:
        probe_video(cut)
    _one_line(e)
    gif = tmp_path / "cut.gif"
    buffer = io.BytesIO()
    images = [Image.fromarray(f) for f in photo_frames(4, 40, 40)]
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=100)
    gif.write_bytes(buffer.getvalue()[:40])  # header, then nothing
    with pytest.raises(VideoError) as e:
        load_video(gif, lambda info: [0])
    assert "cut.gif" in _one_line(e)


def test_zero_frames(tmp_path):
    empty_folder = tmp_path / "no_frames"
    empty_folder.mkdir()
    (empty_folder / "readme.txt").write_text("no images here")
    with pytest.raises(VideoError, match="zero frames"):
        probe_video(empty_folder)
    with pytest.raises(VideoError, match="zero frames"):
        probe_video(np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(VideoError, match="zero frames"):
        probe_video([])
    with av.open(str(tmp_path / "none.avi"), "w") as container:  # a video stream without a single frame
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    with pytest.raises(VideoError, match="zero frames") as e:
        load_video(tmp_path / "none.avi", lambda info: [0])
    assert "none.avi" in _one_line(e)


def test_huge_resolution_refused_before_decoding(clips, tmp_path, monkeypatch):
    import vlm_core.kernels.video as video

    def no_decoding(self, wanted):
        raise AssertionError("decoded a frame of a clip it should refuse")

    monkeypatch.setattr(video._ContainerReader, "read", no_decoding)
    with pytest.raises(VideoError, match=r"320x240 = 76800 pixels, over the limit of 10000") as e:
        load_video(clips["mp4"], lambda info: [0], max_frame_pixels=10_000)
    _one_line(e)
    # A 30-byte GIF whose header claims a 9000 x 9000 screen: refused by the default limit from the header.
    gif = (b"GIF89a" + (9000).to_bytes(2, "little") * 2 + b"\x00\x00\x00"
           + b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")
    assert 9000 * 9000 > MAX_FRAME_PIXELS
    with pytest.raises(VideoError, match="9000x9000"):
        probe_video(gif)
    with pytest.raises(VideoError, match="over the limit"):
        probe_video(np.zeros((2, 40, 40, 3), np.uint8), max_frame_pixels=1000)


def test_pyav_missing_names_the_install(clips, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError, as when it is not installed
    with pytest.raises(VideoError) as e:
        probe_video(clips["mp4"])
    message = _one_line(e)
    assert message.startswith(os.fspath(clips["mp4"]))
    assert "pip install 'vlm-core[video]'" in message and "pip install av" in message
    assert "GIF/WebP and frame folders work without it" in message


def test_bad_frame_lists(tmp_path):
    frames = photo_frames(3, 32, 48)
    with pytest.raises(VideoError, match="frame 1 is 24x32 but frame 0 is 48x32"):
        load_video([frames[0], frames[1][:, :24], frames[2]], lambda info: [0, 1, 2])
    with pytest.raises(VideoError, match="frame 1: .*not found"):
        load_video([frames[0], str(tmp_path / "gone.png")], lambda info: [0, 1])
    with pytest.raises(VideoError, match="uint8"):
        probe_video(frames.astype(np.float32))
    with pytest.raises(VideoError, match="outside the video's 3 frames"):
        load_video(frames, lambda info: [0, 3])


# --- export: the manifest's "video_preprocessing" --------------------------------------------------------

def test_export_writes_video_preprocessing(tmp_path, processor_class):
    import json

    from vlm_core.export.assets import video_preprocessor_config
    from vlm_core.export.demo import PREPROCESSOR, VIDEO_PREPROCESSOR
    from vlm_core.export.qwen3_vl import video_preprocessing_params

    vision = {"patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2}
    manifest = {"vision_config": vision, "preprocessing": PREPROCESSOR}
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_PREPROCESSOR))
    raw = video_preprocessor_config(str(tmp_path))
    written = video_preprocessing_params(raw, manifest)
    loaded = processor_class.from_pretrained(str(tmp_path))  # what transformers reads from the same folder
    assert VideoProcessorParams.from_dict(written) == \
        VideoProcessorParams.from_dict({**loaded.to_dict(), "cap_pixels_per_frame": False})
    assert written["size"] == {"shortest_edge": 4096, "longest_edge": 25165824} and json.dumps(written)
    # processor_config.json's nested "video_processor" wins, as in transformers
    (tmp_path / "processor_config.json").write_text(json.dumps({"video_processor": {**VIDEO_PREPROCESSOR, "fps": 1}}))
    assert video_preprocessing_params(video_preprocessor_config(str(tmp_path)), manifest)["fps"] == 1
    # no video config: the image config's bounds on the ViT geometry (transformers' fallback)
    assert video_preprocessing_params({}, manifest) == VideoProcessorParams.from_image_params(PREPROCESSOR,
                                                                                              vision).to_dict()
    with pytest.raises(ValueError, match="patch_size=14 but the vision model has patch_size=16"):
        video_preprocessing_params({**VIDEO_PREPROCESSOR, "patch_size": 14}, manifest)
