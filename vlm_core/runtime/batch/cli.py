"""`vlm-batch -m OUT -i requests.jsonl -o results.jsonl`: answer an OpenAI batch file with an exported model.

Loads the model once, builds the server's app (the 'serve' extra) and answers every line through it; see
runtime/batch/__init__.py for the format, resuming and the output guarantees. Exit status 0 when every line
has an output line (some may be errors: they are in the file), 2 for a usage error, 1 if the run failed.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from vlm_core.command_name import command_name
from vlm_core.errors import UserError
from vlm_core.runtime.server.config import ServeConfig, default


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog or command_name("vlm-batch", "vlm_core.runtime.batch"),
                                description="Answer a JSONL file of OpenAI chat-completions requests ({custom_id, "
                                            "method, url, body} per line) into a JSONL file of answers ({id, "
                                            "custom_id, response: {status_code, body}, error}), as OpenAI's Batch "
                                            "API and vLLM's run_batch do. A rerun resumes: lines whose custom_id is "
                                            "already answered are skipped.")
    p.add_argument("-m", "--model", required=True, help="exported model folder (from `vlm-export`)")
    p.add_argument("-i", "--input", required=True, help="the requests, one JSON object per line")
    p.add_argument("-o", "--output", required=True,
                   help="the answers; written whole at the end (OUTPUT.partial holds them as they complete)")
    p.add_argument("--parallel", type=int, default=default("parallel"),
                   help=f"sequences decoded together (default {default('parallel')}); twice as many requests are "
                        f"in flight so the engine never waits for the next prompt")
    p.add_argument("--threads", type=int, default=default("threads"),
                   help="ONNX Runtime threads (default: all cores)")
    p.add_argument("--prefill-chunk", type=int, default=default("prefill_chunk"), help="prompt tokens per call")
    p.add_argument("--cache-mb", type=float, default=default("cache_mb"),
                   help=f"prefix-KV and image-feature caches (default {default('cache_mb'):g}; lines sharing a "
                        f"system prompt or an image reuse its work)")
    p.add_argument("--model-name", default=default("model_name"),
                   help="the model id the bodies' \"model\" must name when they give one (default: the folder's "
                        "name)")
    p.add_argument("--default-max-tokens", type=int, default=default("default_max_tokens"),
                   help=f"max_tokens for a body that gives none (default {default('default_max_tokens')})")
    p.add_argument("--max-images", type=int, default=default("max_images"), help="most images in one request")
    p.add_argument("--allow-remote-media", action="store_true",
                   help="let bodies name http(s) image and video URLs (off: data: URLs only)")
    p.add_argument("--timeout", type=float, default=default("timeout"),
                   help=f"seconds one line may take (default {default('timeout'):g})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def main(argv=None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    if not os.path.isfile(args.input):
        raise UserError(f"input file {args.input!r} does not exist")
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        raise UserError("--output must not be the --input file")
    if args.parallel < 1:
        raise UserError(f"--parallel must be at least 1, got {args.parallel}")
    concurrency = 2 * args.parallel
    # the queue holds every request in flight: a worker is released a moment after its answer is complete,
    # so a queue of only (concurrency - parallel) could refuse the next line with a 429
    config = ServeConfig(model=args.model, threads=args.threads, parallel=args.parallel,
                         prefill_chunk=args.prefill_chunk, cache_mb=args.cache_mb, max_queue=concurrency,
                         timeout=args.timeout, model_name=args.model_name, max_images=args.max_images,
                         default_max_tokens=args.default_max_tokens, allow_remote_media=args.allow_remote_media,
                         log_level="warning")
    config.check()
    try:
        from vlm_core.runtime.server.app import create_app
    except ImportError:
        raise UserError("vlm-batch needs the 'serve' extra: pip install 'vlm-core[serve]' (starlette)") from None
    from vlm_core.runtime.batch.progress import Progress
    from vlm_core.runtime.batch.results import ResultFile
    from vlm_core.runtime.batch.runner import run_batch

    logging.basicConfig(level="WARNING", format="%(levelname)s: %(message)s")
    app = create_app(config)
    progress = Progress(0, enabled=not args.no_progress)
    results = ResultFile(args.output)
    try:
        summary = asyncio.run(run_batch(app, args.input, results, concurrency=concurrency,
                                        progress=progress))
    finally:
        results.close()
        app.state.scheduler.close()
    resumed = f", {summary.resumed} resumed from an earlier run" if summary.resumed else ""
    print(f"{summary.lines} lines: {summary.answered} answered now ({summary.errors} with errors){resumed}; "
          f"{summary.written} lines in {args.output}", file=sys.stderr)
    return 0
