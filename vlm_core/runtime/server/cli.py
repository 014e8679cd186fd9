"""`python -m vlm_core.runtime.server -m OUT`: parse the options into a ServeConfig, load the model, serve."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from vlm_core.command_name import command_name
from vlm_core.errors import UserError
from vlm_core.kernels.image import ImageError
from vlm_core.runtime.cluster.launch import add_arguments as add_ray_arguments
from vlm_core.runtime.server.config import ServeConfig, default, is_loopback


# The per-request limits: (flag, type, help with the default's place); defaults come from ServeConfig.
REQUEST_LIMITS = (
    ("--max-queue", int, "requests that may wait for a worker (default {}); more get 429"),
    ("--timeout", float, "seconds a request may take, queueing included (default {:g})"),
    ("--body-timeout", float, "seconds a request body may take to arrive once its headers have (default {:g}); "
                              "later is a 408"),
    ("--header-timeout", float, "seconds a request's headers may take to arrive once its connection is open or the "
                                "previous answer is sent (default {:g}); later is a 408 and the connection closed"),
    ("--keep-alive-timeout", float, "seconds an idle connection is kept open between requests (default {:g})"),
    ("--max-connections", int, "open connections at most, idle ones included (default {}); more get 503"),
    ("--max-body-mb", float, "largest request body in MiB (default {:g}: a video sent as a data: URL takes 4/3 of "
                             "its file size), and the most fetched for one remote image or video"),
    ("--max-images", int, "most images in one request (default {})"),
    ("--max-videos", int, "most videos in one request (default {})"),
    ("--max-image-pixels", int, "most pixels (width x height) of an uploaded image or video frame, checked before "
                                "decoding (default {:,})"),
)
IMAGE_BUDGET = (
    ("--min-pixels", "each image's least area in pixels after resizing (default: the model's preprocessing)"),
    ("--max-pixels", "each image's most area in pixels after resizing, so at most max_pixels / (patch x merge)^2 "
                     "image tokens (default: the model's preprocessing); a request's max_pixels may only lower it"),
)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The options; every default comes from ServeConfig."""
    p = argparse.ArgumentParser(prog=prog or command_name("vlm-serve", "vlm_core.runtime.server"), description="OpenAI-compatible HTTP server (and a chat page at /) for "
                                                       "an exported model.")
    p.add_argument("-m", "--model", required=True, help="exported model folder (from `python -m vlm_core.export`)")
    p.add_argument("--host", default=default("host"),
                   help=f"address to bind (default {default('host')}: this machine only)")
    p.add_argument("--port", type=int, default=default("port"),
                   help=f"port (default {default('port')}; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get("VLM_API_KEY", default("api_key")),
                   help="require 'Authorization: Bearer KEY' on /v1/ (default: $VLM_API_KEY, else none)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow a non-loopback --host without --api-key (anyone who reaches the port can use it)")
    p.add_argument("--allow-remote-media", action="store_true",
                   help="let requests name http(s) image and video URLs, fetched by the server (off: data: URLs only)")
    p.add_argument("--cors-origin", dest="cors_origins", action="append", default=list(default("cors_origins")),
                   metavar="ORIGIN", help="let pages from ORIGIN (https://app.example.com; repeatable; '*' for any) "
                                          "call the API and read its answers (default: none, so a page on another "
                                          "site cannot)")
    p.add_argument("--model-name", default=default("model_name"),
                   help="the model id clients use (default: the folder's name)")
    p.add_argument("--threads", type=int, default=default("threads"),
                   help="ONNX Runtime threads per generation (default: all cores)")
    p.add_argument("--parallel", type=int, default=default("parallel"),
                   help=f"sequences decoded together in one batch (default {default('parallel')}); more requests "
                        f"wait in the queue")
    p.add_argument("--prefill-chunk", type=int, default=default("prefill_chunk"),
                   help=f"prompt tokens per decoder call (default {default('prefill_chunk')}): a new prompt holds "
                        f"running answers up for one chunk at most")
    p.add_argument("--cache-mb", type=float, default=default("cache_mb"),
                   help=f"memory for the prefix-KV and image-feature caches, least recently used evicted "
                        f"(default {default('cache_mb'):g}; 0 turns them off)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="make every request batch-invariant by default: its tokens are exactly those it gives alone, "
                        "whatever is decoded beside it (slower on int4/int8 models). Off by default; a request can "
                        "ask for it with the body field \"batch_invariant\": true")
    p.add_argument("--no-jump-forward", dest="jump_forward", action="store_false",
                   help="decode the tokens a JSON schema or grammar forces one step each, as free tokens are (for "
                        "measurement and debugging: the answers are the same). By default they go through the "
                        "decoder as one chunk; a request can turn it off with the body field \"jump_forward\": false")
    p.add_argument("--no-prepacked-cache", dest="prepacked_cache", action="store_false",
                   help="pack a 4-bit decoder's weights in memory at every start and write nothing to the model folder. "
                        "By default the first start on a host writes a copy with the weights pre-packed under "
                        "MODEL/prepacked and later starts memory-map it (file-backed pages, not anonymous memory)")
    for flag, kind, text in REQUEST_LIMITS:
        field = flag[2:].replace("-", "_")
        p.add_argument(flag, type=kind, default=default(field), help=text.format(default(field)))
    for flag, text in IMAGE_BUDGET:
        p.add_argument(flag, type=int, default=default(flag[2:].replace("-", "_")), metavar="N", help=text)
    p.add_argument("--video-fps", type=float, default=default("video_fps"), metavar="FPS",
                   help="frames sampled per second of video when a request gives no video_fps (default: the "
                        "model's video_preprocessor_config.json)")
    p.add_argument("--video-max-frames", type=int, default=default("video_max_frames"), metavar="N",
                   help="most frames sampled from one video when a request gives no video_max_frames")
    p.add_argument("--video-max-pixels", type=int, default=default("video_max_pixels"), metavar="N",
                   help="most pixels over all of a video's sampled frames when a request gives no video_max_pixels")
    p.add_argument("--default-max-tokens", type=int, default=default("default_max_tokens"),
                   help=f"max_tokens when a request gives none (default {default('default_max_tokens')}, "
                        f"within the context)")
    p.add_argument("--log-level", default=default("log_level"),
                   choices=["critical", "error", "warning", "info", "debug"])
    add_ray_arguments(p)  # --ray, --replicas, --ray-address, ... (runtime/cluster/launch.py)
    return p


def main(argv=None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    config = ServeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)})
    try:
        config.check()
        if not is_loopback(config.host) and not config.api_key:
            print(f"warning: listening on {config.host} with no API key: anyone who can reach this port can use "
                  f"the model", file=sys.stderr)
        if args.ray:  # the same routes through Ray Serve, over --replicas model replicas
            from vlm_core.runtime.cluster.launch import serve_on_ray

            return serve_on_ray(config, args)
        try:
            import uvicorn

            from vlm_core.runtime.server.app import create_app
        except ImportError:
            raise UserError("the server needs the 'serve' extra: pip install 'vlm-core[serve]' (starlette, uvicorn)") \
                from None
        logging.basicConfig(level=config.log_level.upper(), format="%(levelname)s: %(message)s")
        app = create_app(config)
    except (UserError, ImageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    serve(app, config, uvicorn)
    return 0


def serve(app, config: ServeConfig, uvicorn) -> None:
    """Run uvicorn until stopped, printing the bound address once listening (with --port 0, the one picked)."""
    from vlm_core.runtime.server.head_deadline import head_deadline_protocol

    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                                           http=head_deadline_protocol(config.header_timeout), ws="none",
                                           lifespan="on", timeout_graceful_shutdown=5,
                                           timeout_keep_alive=config.keep_alive_timeout,
                                           limit_concurrency=config.max_connections))
    original_startup = server.startup

    async def startup(sockets=None):
        await original_startup(sockets)
        for s in server.servers:
            for sock in s.sockets:
                host, port = sock.getsockname()[:2]
                host = f"[{host}]" if ":" in host else host
                print(f"serving {config.name!r} on http://{host}:{port}/ (OpenAI API at /v1)", flush=True)

    server.startup = startup
    server.run()
