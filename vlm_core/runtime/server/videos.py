"""Videos from a request: a video_url value -> encoded bytes -> probed (header only) before queueing.

The bytes come as images' do (`images.image_bytes(..., kind="video")`: ``data:`` URLs, ``http(s)`` only with
``--allow-remote-media``, never a local path). `check_video` reads what the container says (frame count,
size; no frame decoded) so that a file that is not a video, has no frames or has frames over the pixel limit
is refused with a 400 naming its field, without taking a place in the queue. Frames are decoded later, on
the worker thread, by the engine's `prepare` (the family samples and decodes only the frames it keeps).

kernels.video is imported only when a request holds a video.
"""
from __future__ import annotations

import contextlib
import dataclasses

from vlm_core.errors import ParameterError


@dataclasses.dataclass(frozen=True)
class EncodedVideo:
    """A video's bytes as the request gave them (container header already probed), and where it was in the body."""

    data: bytes
    param: str


def check_video(data: bytes, max_frame_pixels: int, param: str) -> EncodedVideo:
    """Refuse what is not a readable video (no frames, frames over `max_frame_pixels`, PyAV missing for a video
    file) from its header: cheap, before queueing. The error names the field `param`."""
    from vlm_core.kernels.video import MAX_FRAME_PIXELS, probe_video

    video = EncodedVideo(data, param)
    with as_request_error([video]):
        probe_video(data, min(max_frame_pixels, MAX_FRAME_PIXELS))
    return video


@contextlib.contextmanager
def as_request_error(videos: list):
    """kernels.video's VideoError -> a ParameterError naming the field of the video it is about: the one whose
    source name (``<N bytes of video>``) begins the message, else the only video, else ``messages``."""
    from vlm_core.kernels.video import VideoError, VideoTooLong, describe_video

    try:
        yield
    except VideoError as e:
        message, param = str(e), "messages"
        if isinstance(e, VideoTooLong):
            message = e.message(("video_fps", "video_max_frames", "video_max_pixels", "lower max_tokens"))
        named = [v for v in videos if message.startswith(describe_video(v.data) + ": ")]
        if len(named) == 1 or len(videos) == 1:
            video = (named or videos)[0]
            message, param = message.removeprefix(describe_video(video.data) + ": "), video.param
            message = f"{param}: {message}"
        raise ParameterError(message, param=param, code="invalid_video") from None
