"""Video frames for a vision-language model: read a clip's frames as uint8 RGB, and resize them. No torch.

Sources (`VideoSource`):

* a video file, as a path, raw bytes or a ``data:video/...;base64,`` URL: decoded with PyAV (the `av`
  wheels bundle FFmpeg; `pip install 'vlm-core[video]'`), imported only when such a file is read;
* an animated GIF or WebP (path, bytes or data: URL): Pillow, no PyAV needed; fps from the frame durations;
* a folder of frame images, in natural name order (``f2.png`` before ``f10.png``); fps unknown (None);
* a list or tuple of frames: image paths, PIL images or H x W x 3 uint8 arrays; fps unknown;
* a uint8 array [T, H, W, 3]; fps unknown.

Two steps, so a caller can refuse a clip before decoding it: `probe_video` reads what the container says
(frame count, fps, size); `load_video` decodes only the frames a caller picks from that `VideoInfo`, and
stops after the last one. Frames of a video file are what transformers' PyAV loader gives
(`transformers.video_utils.read_video_pyav`: decode from the start, `frame.to_ndarray(format="rgb24")`).

Metadata can lie: a container that promises more frames than it holds gets the missing indices clamped to
its last decoded frame (so the clip keeps the length it was planned with); only a clip with no decodable
frame is an error. Every failure is a `VideoError` whose one-line message names the source.

Resizing frames (torch's uint8 antialiased bicubic, bit for bit) is kernels/bicubic.py: what transformers'
Qwen3-VL video processor applies through torchvision.
"""
from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
from PIL import Image, ImageSequence

from vlm_core.errors import ParameterError
from vlm_core.kernels.image import (
    ImageError,
    convert_to_rgb,
    describe_source,
    load_image,
)

VideoSource = Union[str, "os.PathLike[str]", bytes, bytearray, np.ndarray, Sequence[Any]]

# Largest frame accepted (width x height), checked from the metadata before decoding where it is known.
MAX_FRAME_PIXELS = 8192 * 8192
PYAV_MISSING = ("video files need PyAV: pip install 'vlm-core[video]' (or pip install av); "
                "animated GIF/WebP and frame folders work without it")


class VideoError(ParameterError):
    """A video could not be read or is unusable; the one-line message names the source and what to do."""

    code = "invalid_video"


class VideoTooLong(VideoError):
    """Clips whose frames cannot fit the context, found from their headers before any frame is decoded.

    `str()` names the budget as the Python API spells it; `message(names)` in another front end's words
    (`names`: the frames-per-second, max-frames, max-pixels and max-new-tokens settings, e.g. the CLI's flags)."""

    API_NAMES = ("video fps", "max_frames", "max_pixels", "max_new_tokens")

    def __init__(self, source: str, frames: int, width: int, height: int, tokens: int, room: int):
        self.source, self.frames, self.width, self.height, self.tokens, self.room = (source, frames, width, height,
                                                                                     tokens, room)
        super().__init__(self.message(self.API_NAMES))

    def message(self, names) -> str:
        """The one-line error naming the four budget settings `names` (fps, max frames, max pixels, new tokens)."""
        fps, frames, pixels, new_tokens = names
        return (f"{self.source}: {self.frames} frames of {self.width}x{self.height} need about {self.tokens} prompt "
                f"tokens (with the clips before it), over the {self.room} the context has room for; sample fewer "
                f"frames ({fps}, {frames}), lower the clip's pixel budget ({pixels}) or {new_tokens}")


@dataclass
class VideoInfo:
    """What a source says about itself before any frame is decoded."""

    total_frames: int
    fps: float | None  # None: unknown (frame folders, frame lists, arrays, a GIF without durations)
    height: int
    width: int


@dataclass
class VideoClip:
    """The sampled frames of a source."""

    frames: np.ndarray  # uint8 [T, H, W, 3] RGB
    frame_indices: np.ndarray  # int64 [T], indices into the source's frames
    fps: float | None  # the source's frame rate (None: unknown)
    total_frames: int  # frames in the source (those decoded, when the metadata promised more)


def describe_video(source) -> str:
    """A short name for a video source, for messages (a long string such as a data: URL is cut)."""
    if isinstance(source, str) and source[:5].lower() == "data:":
        return f"data: URL ({len(source)} characters)"
    if isinstance(source, (str, os.PathLike)):
        return describe_source(source)
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes of video>"
    if isinstance(source, np.ndarray):
        return f"<array {'x'.join(map(str, source.shape))} {source.dtype}>"
    if isinstance(source, (list, tuple)):
        return f"<frame list of {len(source)}>"
    return f"<{type(source).__name__}>"


def probe_video(source: VideoSource, max_frame_pixels: int = MAX_FRAME_PIXELS) -> VideoInfo:
    """Frame count, fps and size of a source, decoding no frame where the container allows it.

    A video file's count is its stream's `frames` when set, else duration x average rate, else its
    packets counted (demuxed, not decoded). Animated GIF/WebP are read frame by frame (headers and
    durations), a frame folder's first image header gives the size.

    Raises:
        VideoError: missing file, not a video, no frames, a frame over `max_frame_pixels`, PyAV missing.
    """
    reader = _reader(source, max_frame_pixels)
    try:
        info = reader.probe()
    finally:
        reader.close()
    _check_size(reader.name, info.height, info.width, max_frame_pixels)
    return info


def load_video(source: VideoSource, choose_indices: Callable[[VideoInfo], np.ndarray],
               max_frame_pixels: int = MAX_FRAME_PIXELS) -> VideoClip:
    """Decode the frames `choose_indices(info)` picks from a source -> VideoClip.

    Args:
        source: see the module docstring.
        choose_indices: the source's VideoInfo -> frame indices to keep (any order, repeats allowed).
            Frames past the last index are never decoded.
        max_frame_pixels: largest width x height accepted (checked before decoding where the header tells).
    Returns:
        VideoClip with one frame per chosen index, in the order given. Indices past the frames that
        actually exist (lying metadata) are clamped to the last one, and `frame_indices` says so.
    Raises:
        VideoError: as `probe_video`, plus a corrupt or truncated stream, or indices out of range.
    """
    reader = _reader(source, max_frame_pixels)
    try:
        info = reader.probe()
        _check_size(reader.name, info.height, info.width, max_frame_pixels)
        indices = np.asarray(choose_indices(info), dtype=np.int64).reshape(-1)
        if indices.size == 0:
            raise VideoError(f"{reader.name}: no frames were chosen to read")
        if indices.min() < 0 or indices.max() >= max(info.total_frames, 1):
            raise VideoError(f"{reader.name}: frame indices {indices.min()}..{indices.max()} are outside the "
                             f"video's {info.total_frames} frames")
        wanted = np.unique(indices)
        decoded = reader.read(wanted)  # {index: frame} for the wanted indices that exist
    finally:
        reader.close()
    if not decoded:
        raise VideoError(f"{reader.name}: no frame could be decoded (empty, truncated or corrupt video)")
    last = max(decoded)
    actual = np.minimum(indices, last)  # metadata promised frames that are not there: use the last one
    frames = [decoded[i] for i in actual.tolist()]
    height, width = frames[0].shape[:2]
    _check_size(reader.name, height, width, max_frame_pixels)
    for i, frame in zip(actual.tolist(), frames, strict=True):
        if frame.shape != frames[0].shape:
            raise VideoError(f"{reader.name}: frame {i} is {frame.shape[1]}x{frame.shape[0]} but frame "
                             f"{actual[0]} is {width}x{height}; all frames of a clip must have one size")
    total = info.total_frames if last >= wanted[-1] else reader.frames_seen
    return VideoClip(np.stack(frames), actual, info.fps, total)


def _check_size(name: str, height: int, width: int, max_frame_pixels: int) -> None:
    if height and width and height * width > max_frame_pixels:
        raise VideoError(f"{name}: frames are {width}x{height} = {width * height} pixels, over the limit of "
                         f"{max_frame_pixels}; scale the video down first (e.g. ffmpeg -vf scale=1920:-2)")


# --- readers: one per kind of source, each with probe() -> VideoInfo and read(sorted indices) -> {i: frame}

def _reader(source, max_frame_pixels: int = MAX_FRAME_PIXELS):
    """Pick the reader for a source (data: URLs decoded, files sniffed: GIF/WebP to Pillow, others to PyAV)."""
    name = describe_video(source)
    if isinstance(source, np.ndarray):
        return _ArrayReader(source, name)
    if isinstance(source, (list, tuple)):
        return _FrameListReader(list(source), name)
    if isinstance(source, str) and source[:5].lower() == "data:":
        from vlm_core.kernels.image_url import decode_data_url

        try:
            source = decode_data_url(source)
        except ImageError as e:
            raise VideoError(str(e)) from None
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        if not data:
            raise VideoError(f"{name}: empty video data")
        if _is_animated_image(data[:16]):
            return _AnimatedImageReader(io.BytesIO(data), name, max_frame_pixels)
        return _ContainerReader(io.BytesIO(data), name, max_frame_pixels)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            return _FrameListReader(_frame_files(path, name), name)
        if not os.path.isfile(path):
            raise VideoError(f"{name}: video file not found")
        try:
            with open(path, "rb") as f:
                head = f.read(16)
        except OSError as e:
            raise VideoError(f"{name}: cannot read the file ({e.strerror or e})") from None
        if not head:
            raise VideoError(f"{name}: empty file, not a video")
        if _is_animated_image(head):
            return _AnimatedImageReader(path, name, max_frame_pixels)
        return _ContainerReader(path, name, max_frame_pixels)
    raise VideoError(f"{name}: unsupported video input; pass a file path, a frame folder, a data: URL, bytes, "
                     "a list of frames or a uint8 [T, H, W, 3] array")


def _is_animated_image(head: bytes) -> bool:
    """GIF or WebP magic bytes: read with Pillow rather than PyAV."""
    return head[:6] in (b"GIF87a", b"GIF89a") or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _frame_files(folder: str, name: str) -> list[str]:
    """A folder's image files (by extension Pillow knows), in natural name order."""
    extensions = {ext.lower() for ext in Image.registered_extensions()}
    names = [n for n in os.listdir(folder) if not n.startswith(".") and os.path.splitext(n)[1].lower() in extensions
             and os.path.isfile(os.path.join(folder, n))]
    if not names:
        raise VideoError(f"{name}: folder holds no frame images (png, jpg, ...); zero frames")
    return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


class _ArrayReader:
    """A uint8 [T, H, W, 3] array (RGB)."""

    def __init__(self, array: np.ndarray, name: str):
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
            raise VideoError(f"{name}: a video array must be uint8 [frames, height, width, 3] RGB")
        if array.shape[0] == 0 or array.shape[1] == 0 or array.shape[2] == 0:
            raise VideoError(f"{name}: video has zero frames" if array.shape[0] == 0 else f"{name}: empty frames")
        self.array, self.name, self.frames_seen = array, name, len(array)

    def probe(self) -> VideoInfo:
        t, h, w, _ = self.array.shape
        return VideoInfo(t, None, h, w)

    def read(self, wanted: np.ndarray) -> dict:
        return {i: self.array[i] for i in wanted.tolist()}

    def close(self) -> None:
        pass


class _FrameListReader:
    """Frames as image paths, PIL images or H x W x 3 uint8 arrays (a folder's files are paths)."""

    def __init__(self, frames: list, name: str):
        if not frames:
            raise VideoError(f"{name}: video has zero frames")
        self.frames, self.name, self.frames_seen = frames, name, len(frames)

    def probe(self) -> VideoInfo:
        height, width = self._size(self.frames[0], 0)
        return VideoInfo(len(self.frames), None, height, width)

    def _size(self, frame, i: int) -> tuple[int, int]:
        if isinstance(frame, np.ndarray):
            return frame.shape[:2]
        if isinstance(frame, Image.Image):
            return frame.height, frame.width
        if isinstance(frame, (str, os.PathLike)) and os.path.isfile(frame):
            try:
                with Image.open(frame) as image:  # header only
                    turned = image.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientation: load_image turns it
                    return (image.width, image.height) if turned else (image.height, image.width)
            except Exception:
                return self._load(frame, i).shape[:2]  # let the full decode report the problem
        return self._load(frame, i).shape[:2]

    def _load(self, frame, i: int) -> np.ndarray:
        if isinstance(frame, np.ndarray):
            if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
                raise VideoError(f"{self.name}: frame {i} must be a uint8 [height, width, 3] RGB array, got "
                                 f"{frame.dtype} {list(frame.shape)}")
            return frame
        if isinstance(frame, (bytes, bytearray)) or not isinstance(frame, (str, os.PathLike, Image.Image)):
            raise VideoError(f"{self.name}: frame {i} is a {type(frame).__name__}; frames must be image paths, "
                             "PIL images or uint8 arrays")
        try:
            return np.asarray(load_image(frame))
        except ImageError as e:
            raise VideoError(f"{self.name}: frame {i}: {e}") from None

    def read(self, wanted: np.ndarray) -> dict:
        return {i: self._load(self.frames[i], i) for i in wanted.tolist()}

    def close(self) -> None:
        pass


class _AnimatedImageReader:
    """Animated GIF or WebP through Pillow; fps = frames / total duration (None when no durations)."""

    def __init__(self, file, name: str, max_frame_pixels: int):
        self.name, self.max_frame_pixels = name, max_frame_pixels
        try:
            self.image = Image.open(file)
        except Image.DecompressionBombError as e:
            raise VideoError(f"{name}: frames too large to decode safely ({e})") from None
        except Exception as e:  # Pillow's plugins raise many types on hostile headers
            raise VideoError(f"{name}: not a readable GIF/WebP ({e})") from None
        self.frames_seen = 0

    def probe(self) -> VideoInfo:
        image = self.image
        _check_size(self.name, image.height, image.width, self.max_frame_pixels)  # before reading any frame
        count, duration_ms = 0, 0.0
        try:
            for frame in ImageSequence.Iterator(image):
                if image.format == "WEBP":
                    frame.load()  # WebP tells a frame's duration only once it is decoded
                count += 1
                duration_ms += float(frame.info.get("duration") or 0)
            image.seek(0)
        except Exception as e:  # a truncated animation is refused: its last frames are missing or half drawn
            raise VideoError(f"{self.name}: corrupt or truncated {image.format}, unreadable after {count} "
                             f"frames ({e})") from None
        if count == 0:
            raise VideoError(f"{self.name}: video has zero frames")
        self.frames_seen = count
        fps = 1000.0 * count / duration_ms if duration_ms > 0 else None
        return VideoInfo(count, fps, image.height, image.width)

    def read(self, wanted: np.ndarray) -> dict:
        out, last, want = {}, int(wanted[-1]), set(wanted.tolist())
        count = 0
        try:
            for frame in ImageSequence.Iterator(self.image):
                if count in want:
                    out[count] = self._rgb(frame)
                count += 1
                if count > last:
                    break
        except Exception as e:  # a frame that does not decode (truncated data) is refused, not skipped
            raise VideoError(f"{self.name}: corrupt or truncated {self.image.format}, unreadable after {count} "
                             f"frames ({e})") from None
        self.frames_seen = count
        if 0 < count <= last and (count - 1) not in out:  # fewer frames than promised: keep the last
            self.image.seek(count - 1)
            out[count - 1] = self._rgb(self.image)
        return out

    @staticmethod
    def _rgb(frame: Image.Image) -> np.ndarray:
        frame.load()
        return np.asarray(convert_to_rgb(frame))  # transparency onto white, as for still images

    def close(self) -> None:
        self.image.close()


# FFmpeg demuxers that turn text into frames (tty: ANSI/ASCII art, so any .txt file; bintext's bin, xbin, adf,
# idf): a text file given as a video is a mistake, not a clip of rendered characters.
TEXT_DEMUXERS = frozenset({"tty", "bin", "xbin", "adf", "idf"})


def _import_av():
    try:
        import av
    except ImportError:
        return None
    return av


class _ContainerReader:
    """A video container (mp4, webm, mkv, avi, mov, ...) through PyAV, decoded as transformers' read_video_pyav."""

    def __init__(self, file, name: str, max_frame_pixels: int):
        self.name, self.container, self.frames_seen, self.max_frame_pixels = name, None, 0, max_frame_pixels
        av = _import_av()
        if av is None:
            raise VideoError(f"{name}: {PYAV_MISSING}")
        self.av, self.file = av, file
        self._open()

    def _open(self) -> None:
        if self.container is not None:
            self.container.close()
        if isinstance(self.file, io.BytesIO):
            self.file.seek(0)
        try:
            self.container = self.av.open(self.file, mode="r")
        except (self.av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as e:
            raise VideoError(f"{self.name}: not a video file, or a corrupt or truncated one "
                             f"(FFmpeg: {_reason(e)})") from None
        if self.container.format.name in TEXT_DEMUXERS:
            raise VideoError(f"{self.name}: a text file, not a video (FFmpeg reads it as a {self.container.format.name} "
                             f"text-art clip)")
        if not self.container.streams.video:
            raise VideoError(f"{self.name}: has no video stream (an audio file or an image?)")
        self.stream = self.container.streams.video[0]

    def probe(self) -> VideoInfo:
        stream = self.stream
        height = stream.codec_context.height or stream.height or 0
        width = stream.codec_context.width or stream.width or 0
        _check_size(self.name, height, width, self.max_frame_pixels)  # before counting or decoding anything
        fps = float(stream.average_rate) if stream.average_rate else None
        total = int(stream.frames or 0)
        if total <= 0 and fps:
            seconds = None
            if stream.duration and stream.time_base:
                seconds = float(stream.duration * stream.time_base)
            elif self.container.duration:
                seconds = self.container.duration / 1_000_000  # AV_TIME_BASE
            if seconds:
                total = int(round(seconds * fps))
        if total <= 0:
            total = self._count_packets()
        if total <= 0:
            raise VideoError(f"{self.name}: video has zero frames")
        return VideoInfo(total, fps, height, width)

    def _count_packets(self) -> int:
        """Frames of a stream whose header has no count or duration: its packets, demuxed but not decoded."""
        count = 0
        try:
            for packet in self.container.demux(self.stream):
                if packet.size:
                    count += 1
        except self.av.FFmpegError:
            pass  # a truncated file: what was counted
        self._open()  # back to the start (raw streams cannot seek)
        return count

    def read(self, wanted: np.ndarray) -> dict:
        """Decode from the start, keeping the wanted frames (transformers' loop: seek(0), decode, break)."""
        out, last, want = {}, int(wanted[-1]), set(wanted.tolist())
        try:
            self.container.seek(0)
        except self.av.FFmpegError:
            self._open()  # unseekable (raw streams): a failed seek leaves the demuxer unusable, so reopen
        self.stream.thread_type = "AUTO"  # frame threads: same pictures, several cores
        count, previous = 0, None
        try:
            for frame in self.container.decode(self.stream):
                if count in want:
                    out[count] = frame.to_ndarray(format="rgb24")
                previous, count = frame, count + 1
                if count > last:
                    break
        except (self.av.FFmpegError, OSError) as e:
            raise VideoError(f"{self.name}: corrupt or truncated video, decoding failed after {count} frames "
                             f"(FFmpeg: {_reason(e)})") from None
        self.frames_seen = count
        if 0 < count <= last and (count - 1) not in out:
            out[count - 1] = previous.to_ndarray(format="rgb24")  # fewer frames than promised: keep the last
        return out

    def close(self) -> None:
        if self.container is not None:
            self.container.close()


def _reason(error: Exception) -> str:
    text = str(getattr(error, "strerror", None) or error).strip().splitlines()
    return text[0] if text else type(error).__name__
