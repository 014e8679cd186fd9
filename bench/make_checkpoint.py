"""Write a random-weight checkpoint folder from a config.json, laid out like a real Hugging Face one.

    python -m bench.make_checkpoint bench/configs/qwen3-vl-2b.json -o checkpoints/qwen3-vl-2b-random

Speed does not depend on weight values, so this is how the real 2B shape is benchmarked here
(no weights can be downloaded). Weights are saved in bfloat16 like the published checkpoints.
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.make_checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a config.json (Qwen3-VL)")
    parser.add_argument("-o", "--output", required=True, help="checkpoint folder to write")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = parser.parse_args(argv)
    with open(args.config, encoding="utf-8") as f:
        config = json.load(f)
    import torch

    from export.demo import write_checkpoint

    write_checkpoint(args.output, config, dtype=getattr(torch, args.dtype))
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
