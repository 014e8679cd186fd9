"""Write a random-weight checkpoint folder from a config.json, laid out like a real Hugging Face one.

    python -m bench.make_checkpoint bench/configs/qwen3-vl-2b.json -o checkpoints/qwen3-vl-2b-random
    python -m bench.make_checkpoint bench/configs/minigpt4-7b.json -o checkpoints/minigpt4-7b-random
    python -m bench.make_checkpoint bench/configs/smolvlm2-256m.json -o checkpoints/smolvlm2-256m-random

Speed does not depend on weight values, so this is how the real shapes are benchmarked here (no
weights can be downloaded). Weights are saved in bfloat16 like the published checkpoints. Qwen3-VL
configs go through export.demo.write_checkpoint (tokenizer and templates included), SmolVLM configs
through bench.smolvlm.write_checkpoint (streamed weights + SmolLM2's tokenizer with SmolVLM's tokens +
processor files); other architectures (e.g. BLIP-2 with a LLaMA text model, the MiniGPT-4 layout) are written streamed:
tensor by tensor from an empty model into ~2 GB safetensors shards, so a 7B checkpoint is written
in a few hundred MB of memory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

SHARD_BYTES = 2 << 30


def write_streamed(folder: str, config: dict, dtype, seed: int = 0, scale: float = 0.02, log=print) -> str:
    """Random weights (normal(0, scale); norm weights near 1) for any transformers architecture in `config`,
    written shard by shard with an index, as save_pretrained lays them out."""
    import torch
    import transformers
    from accelerate import init_empty_weights
    from safetensors.torch import save_file

    hf_config = transformers.AutoConfig.for_model(**config)
    model_class = getattr(transformers, config["architectures"][0])
    with init_empty_weights():
        model = model_class._from_config(hf_config)
    os.makedirs(folder, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    names = [name for name, _ in model.named_parameters()]  # tied parameters once, under their first name
    shapes = dict(model.named_parameters())
    weight_map, shard, shard_bytes, index, total = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, shard_bytes, index
        if shard:
            index += 1
            file = f"model-{index:05d}.safetensors"
            save_file(shard, os.path.join(folder, file), metadata={"format": "pt"})
            weight_map.update({k: file for k in shard})
            log(f"  wrote {file} ({shard_bytes / 1e9:.1f} GB, {total / 1e9:.1f} GB so far)")
            shard, shard_bytes = {}, 0

    for name in names:
        shape = shapes[name].shape
        value = torch.randn(shape, generator=generator) * scale
        if "norm" in name.lower() and len(shape) == 1 and name.endswith("weight"):
            value += 1
        shard[name] = value.to(dtype)
        shard_bytes += shard[name].numel() * shard[name].element_size()
        total += shard[name].numel() * shard[name].element_size()
        if shard_bytes >= SHARD_BYTES:
            flush()
    flush()
    files = sorted(set(weight_map.values()))
    renamed = {f: f.replace(".safetensors", f"-of-{len(files):05d}.safetensors") for f in files}
    for old in files:
        os.rename(os.path.join(folder, old), os.path.join(folder, renamed[old]))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}},
                  f, indent=2)
    hf_config.torch_dtype = dtype
    hf_config.save_pretrained(folder)
    return folder


def _write_qwen3_vl(folder: str, config: dict, dtype, log) -> None:
    from vlm_core.export.demo import write_checkpoint

    write_checkpoint(folder, config, dtype=dtype)


def _write_smolvlm(folder: str, config: dict, dtype, log) -> None:
    from .smolvlm import write_checkpoint

    write_checkpoint(folder, config, dtype, log=log)


# model_type -> writer of a complete checkpoint folder (tokenizer, templates, processor files included);
# any other architecture gets its weights and config.json only (write_streamed)
WRITERS = {"qwen3_vl": _write_qwen3_vl, "smolvlm": _write_smolvlm}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.make_checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a config.json (Qwen3-VL, SmolVLM, or any transformers architecture)")
    parser.add_argument("-o", "--output", required=True, help="checkpoint folder to write")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = parser.parse_args(argv)
    with open(args.config, encoding="utf-8") as f:
        config = json.load(f)
    import torch

    dtype = getattr(torch, args.dtype)
    writer = WRITERS.get(config.get("model_type"), write_streamed)
    writer(args.output, config, dtype, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
