"""Command line of the export stage.

    python -m export SRC -o OUT [--force] [--quantize none]
    python -m export --demo -o OUT          # a tiny random-weight Qwen3-VL, no checkpoint needed
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile



def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Convert a Hugging Face VLM checkpoint (Qwen3-VL) into ONNX graphs + manifest.json for the "
                    "torch-free runtime, and verify them against eager PyTorch.")
    parser.add_argument("source", nargs="?", help="checkpoint folder (config.json, *.safetensors, tokenizer.json, "
                                                  "chat template, preprocessor_config.json) or hub id")
    parser.add_argument("-o", "--output", required=True, help="output folder (written atomically)")
    parser.add_argument("--demo", action="store_true",
                        help="export a tiny random-weight Qwen3-VL with the real Qwen vocabulary instead of SRC")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                        help="weights: none = float32 (default); int8 = dynamic int8 MatMuls; int4 = 4-bit "
                             "MatMulNBits decoder (block 32, accuracy level 4) + int8 vision")
    parser.add_argument("--parity-tokens", type=int, default=8,
                        help="greedy tokens compared with eager PyTorch after export (default: 8)")
    args = parser.parse_args(argv)
    if args.demo == (args.source is not None):
        parser.error("give either a checkpoint SRC or --demo")
    if args.parity_tokens < 1:
        parser.error("--parity-tokens must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import torch  # noqa: F401  (export-time dependency: say clearly when it is missing)
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"error: the export stage needs the export extra ({e.name} is missing): "
              f"pip install -e '.[export]'", file=sys.stderr)
        return 2
    from .assets import AssetError
    from .pipeline import ExportError, Progress, run_export

    try:
        with tempfile.TemporaryDirectory(prefix="vlm-demo-") as scratch:
            source = args.source
            progress = Progress(total=7 if args.demo else 6)
            if args.demo:
                from .demo import write_checkpoint

                with progress.step("writing the tiny random-weight demo checkpoint"):
                    source = write_checkpoint(os.path.join(scratch, "qwen3-vl-demo"))
            run_export(source, args.output, force=args.force, quantize=args.quantize, progress=progress,
                       parity_tokens=args.parity_tokens)
    except (ExportError, AssetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written to the output folder", file=sys.stderr)
        return 130
    return 0
