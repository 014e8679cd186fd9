"""Command line of the export stage.

    python -m vlm_core.export SRC -o OUT [--force] [--quantize none|int8|int4|mixed] [--kv-dtype float16|float32]
    python -m vlm_core.export --demo -o OUT          # a tiny random-weight Qwen3-VL, no checkpoint needed
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading

from vlm_core.command_name import command_name
from vlm_core.export.quantize import INT4_ALGORITHM, INT4_ALGORITHMS, INT4_BLOCK_SIZE


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=command_name("vlm-export", "vlm_core.export"),
        description="Convert a Hugging Face VLM checkpoint (Qwen3-VL, SmolVLM / Idefics3, BLIP-2-layout MiniGPT-4) "
                    "into ONNX graphs + manifest.json for the torch-free runtime, and verify them against eager "
                    "PyTorch.")
    parser.add_argument("source", nargs="?", help="checkpoint folder (config.json, *.safetensors, tokenizer.json, "
                                                  "chat template, preprocessor_config.json) or hub id")
    parser.add_argument("-o", "--output", required=True, help="output folder (written atomically)")
    parser.add_argument("--demo", action="store_true",
                        help="export a tiny random-weight Qwen3-VL with the real Qwen vocabulary instead of SRC")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--quantize", choices=("none", "int8", "int4", "mixed"), default="none",
                        help="weights: none = float32 (default); int8 = dynamic int8 MatMuls everywhere; int4 = "
                             "4-bit MatMulNBits decoder (block 32, accuracy level 4) + int8 vision; mixed = int4 "
                             "decoder for single tokens + int8 decoder for the prompt (faster first token, more "
                             "memory) + int8 vision")
    parser.add_argument("--int4-block-size", type=int, choices=(16, 32, 64, 128), default=INT4_BLOCK_SIZE,
                        help="weights per 4-bit scale for int4/mixed (default 32, the most accurate; ONNX Runtime's "
                             "4-bit kernel costs per block, so 64 and 128 decode ~1.3x faster and lose accuracy: "
                             "docs/performance.md)")
    parser.add_argument("--int4-algorithm", choices=INT4_ALGORITHMS, default=INT4_ALGORITHM,
                        help="how int4/mixed fit the 4-bit weights (default rtn: symmetric round-to-nearest; hqq: "
                             "a scale and float zero point per block fitted by HQQ, as accurate at block 128 as rtn "
                             "at 32, but ONNX Runtime has no fast kernel for it: decode ~70x slower, for accuracy "
                             "studies)")
    parser.add_argument("--kv-dtype", choices=("float16", "float32"), default=None,
                        help="the KV cache's dtype in the decoder graph's inputs/outputs (default: float32 for "
                             "--quantize none, which stays exact to eager PyTorch; float16 for int8/int4/mixed). "
                             "float16 halves the cache's memory; new keys/values are rounded before attention "
                             "uses them, so results do not depend on how a prompt is split or cached")
    parser.add_argument("--stream", choices=("auto", "on", "off"), default="auto",
                        help="copy the decoder's weights from the checkpoint one tensor at a time instead of "
                             "loading the model in float32 (auto: when float32 weights exceed half the memory, "
                             "e.g. a 7B model on a 24 GB machine; those then need --quantize int4)")
    parser.add_argument("--parity-tokens", type=int, default=8,
                        help="greedy tokens compared with eager PyTorch after export (default: 8)")
    mini = parser.add_argument_group("MiniGPT-4 original files (instead of SRC; converted to the BLIP-2 layout)")
    mini.add_argument("--minigpt4-vit", metavar="EVA.pth", help="EVA ViT-g weights (eva_vit_g.pth)")
    mini.add_argument("--minigpt4-qformer", metavar="PTH", help="BLIP-2 Q-Former checkpoint (blip2_pretrained*.pth)")
    mini.add_argument("--minigpt4-proj", metavar="PTH", help="MiniGPT-4 checkpoint holding llama_proj")
    mini.add_argument("--minigpt4-llm", metavar="DIR", help="Vicuna / LLaMA folder in Hugging Face format")
    mini.add_argument("--minigpt4-template", choices=("vicuna_v0", "llama2"), default="vicuna_v0",
                      help="conversation template (default: vicuna_v0)")
    mini.add_argument("--minigpt4-vit-depth", type=int, metavar="N",
                      help="ViT blocks to use (default: all but the last, as LAVIS does for EVA-CLIP-g)")
    args = parser.parse_args(argv)
    minigpt4 = [args.minigpt4_vit, args.minigpt4_qformer, args.minigpt4_proj, args.minigpt4_llm]
    if any(minigpt4) and not all(minigpt4):
        parser.error("MiniGPT-4 conversion needs all of --minigpt4-vit, --minigpt4-qformer, --minigpt4-proj "
                     "and --minigpt4-llm")
    args.minigpt4 = all(minigpt4)
    if args.demo + args.minigpt4 + (args.source is not None) != 1:
        parser.error("give one of: a checkpoint SRC, --demo, or the --minigpt4-* files")
    if args.parity_tokens < 1:
        parser.error("--parity-tokens must be at least 1")
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # a terminated export cleans up its staging folder like Ctrl-C does


def main(argv=None) -> int:
    args = parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        import torch  # noqa: F401  (export-time dependency: say clearly when it is missing)
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"error: the export stage needs the export extra ({e.name} is missing): "
              f"pip install 'vlm-core[export]' torch==2.13.0", file=sys.stderr)
        return 2
    from vlm_core.export.errors import ExportError
    from vlm_core.export.pipeline import (
        ExportOptions,
        Progress,
        count_steps,
        export_checkpoint,
    )

    try:
        options = ExportOptions(quantize=args.quantize, kv_dtype=args.kv_dtype, parity_tokens=args.parity_tokens,
                                stream={"auto": None, "on": True, "off": False}[args.stream],
                                int4_block_size=args.int4_block_size, int4_algorithm=args.int4_algorithm,
                                force=args.force)
        prelude_steps = int(args.demo or args.minigpt4)  # writing or converting the checkpoint first
        progress = Progress(total=count_steps(options, prelude_steps=prelude_steps))
        with tempfile.TemporaryDirectory(prefix="vlm-demo-") as scratch:
            source = args.source
            if args.demo:
                from vlm_core.export.demo import write_checkpoint

                with progress.step("writing the tiny random-weight demo checkpoint"):
                    source = write_checkpoint(os.path.join(scratch, "qwen3-vl-demo"))
            elif args.minigpt4:
                from vlm_core.export.minigpt4_convert import convert

                with progress.step("converting the MiniGPT-4 files to the BLIP-2 layout"):
                    source = convert(args.minigpt4_vit, args.minigpt4_qformer, args.minigpt4_proj, args.minigpt4_llm,
                                     os.path.join(scratch, "minigpt4"), template=args.minigpt4_template,
                                     vit_depth=args.minigpt4_vit_depth, log=progress.log)
            export_checkpoint(source, args.output, options, progress)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written to the output folder", file=sys.stderr)
        return 130
    return 0
