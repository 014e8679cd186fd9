"""The server's settings: one dataclass whose defaults the CLI parser and the app both use."""
from __future__ import annotations

import dataclasses
import ipaddress
import os

from vlm_core.errors import UserError


@dataclasses.dataclass
class ServeConfig:
    """Everything `python -m vlm_core.runtime.server` can be told; see `cli.py` for each option's meaning."""

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    allow_remote_media: bool = False  # http(s) image and video URLs (--allow-remote-images is the old name)
    # origins whose pages may read answers (CORS); none by default, so a page on another site cannot
    cors_origins: tuple = ()
    threads: int | None = None
    parallel: int = 4  # sequences decoded together (measured on the 2B int4 shape: see README "Serving many")
    prefill_chunk: int = 128
    cache_mb: float = 256.0
    batch_invariant: bool = False
    jump_forward: bool = True  # off with --no-jump-forward (runtime/engine/jump_forward.py)
    prepacked_cache: bool = True  # off with --no-prepacked-cache (runtime/engine/prepacked.py)
    max_queue: int = 8
    timeout: float = 600.0
    body_timeout: float = 30.0  # seconds for a request body to arrive once its headers have
    header_timeout: float = 10.0  # seconds for a request's headers to arrive (head_deadline.py); later: 408, closed
    keep_alive_timeout: float = 5.0  # an idle connection is closed after this (uvicorn's timeout_keep_alive)
    max_connections: int = 64  # open connections at most (uvicorn's limit_concurrency); more get 503
    max_body_mb: float = 64.0  # a video as a data: URL is 4/3 of its file: clips of up to ~48 MB
    max_images: int = 8
    max_videos: int = 4
    max_image_pixels: int = 40_000_000  # also each video frame's, checked from the container before decoding
    # each image's area after resizing (the CLI's --min-pixels / --max-pixels); None: the model's preprocessing
    min_pixels: int | None = None
    max_pixels: int | None = None
    # the video budget when a request gives none (video_fps, ...); None: the model's video_preprocessor_config.json
    video_fps: float | None = None
    video_max_frames: int | None = None
    video_max_pixels: int | None = None
    default_max_tokens: int = 512
    model_name: str | None = None
    insecure_no_auth: bool = False
    log_level: str = "info"

    @property
    def workers(self) -> int:
        """Requests generating at once: one worker thread per sequence the engine decodes together."""
        return self.parallel

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def video_options(self):
        """The server's default video budget, a models.media.VideoOptions (requests override it field by field)."""
        from vlm_core.models.media import VideoOptions

        return VideoOptions(self.video_fps, self.video_max_frames, self.video_max_pixels)

    @property
    def image_budget(self) -> dict:
        """The server's image budget, {"min_pixels", "max_pixels"} as given (requests may lower max_pixels)."""
        return {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels}

    @property
    def name(self) -> str:
        """The model id clients use."""
        return self.model_name or os.path.basename(os.path.normpath(self.model))

    def check(self) -> None:
        """Refuse settings that cannot work (UserError naming the flag); a public host needs an API key."""
        positive = {"parallel": self.parallel, "prefill-chunk": self.prefill_chunk, "max-images": self.max_images,
                    "max-videos": self.max_videos, "max-image-pixels": self.max_image_pixels,
                    "default-max-tokens": self.default_max_tokens, "max-connections": self.max_connections}
        for flag, value in positive.items():
            if value < 1:
                raise UserError(f"--{flag} must be at least 1, got {value}")
        try:
            self.video_options.check({"fps": "--video-fps", "max_frames": "--video-max-frames",
                                      "max_pixels": "--video-max-pixels"})
        except ValueError as e:
            raise UserError(str(e)) from None
        for flag in ("min-pixels", "max-pixels"):  # their upper bounds depend on the model (create_app checks them)
            value = getattr(self, flag.replace("-", "_"))
            if value is not None and value < 1:
                raise UserError(f"--{flag} must be a positive integer, got {value}")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise UserError(f"--min-pixels ({self.min_pixels}) is larger than --max-pixels ({self.max_pixels})")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be at least 1, got {self.threads}")
        if self.cache_mb < 0:
            raise UserError(f"--cache-mb must be 0 (no cache) or more, got {self.cache_mb:g}")
        if self.max_queue < 0:
            raise UserError(f"--max-queue must be 0 or more, got {self.max_queue}")
        for flag in ("timeout", "max-body-mb", "body-timeout", "header-timeout", "keep-alive-timeout"):
            value = getattr(self, flag.replace("-", "_"))
            if not 0 < value < float("inf"):
                raise UserError(f"--{flag} must be a positive number of {'MiB' if 'mb' in flag else 'seconds'}, "
                                f"got {value:g}")
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port must be in 0..65535, got {self.port}")
        for origin in self.cors_origins:
            scheme, _, rest = origin.partition("://")
            if origin != "*" and not (scheme in ("http", "https") and rest and "/" not in rest):
                raise UserError(f"--cors-origin {origin!r} is not an origin: give scheme://host[:port] as a browser "
                                f"sends it (https://app.example.com, no path or trailing slash), or '*'")
        key = self.api_key
        if key and not (key == key.strip() and key.isascii() and key.isprintable()):  # "   " matched no client
            raise UserError("--api-key (or $VLM_API_KEY) must be printable ASCII, not blank and without leading or "
                            "trailing spaces: clients send it in an 'Authorization: Bearer KEY' header, so such a "
                            "key could never match")
        if not is_loopback(self.host) and not self.api_key and not self.insecure_no_auth:
            raise UserError(f"refusing to listen on {self.host!r} (reachable from other machines) without "
                            f"--api-key; give --api-key KEY, or --insecure-no-auth if you really mean it")
        if not os.path.isdir(self.model):
            raise UserError(f"model folder {self.model!r} does not exist")


def default(name: str):
    """ServeConfig's default for field `name`: the one place defaults are written."""
    return next(f.default for f in dataclasses.fields(ServeConfig) if f.name == name)


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
