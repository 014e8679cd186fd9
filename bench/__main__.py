"""`python -m bench`: eager PyTorch (fp32, bf16) against our runtime (none/none-kv16/int8/int4/mixed) on one machine.

    python -m bench --config bench/configs/qwen3-vl-2b.json --repeats 3

Same model config, image and prompt for every configuration; each repetition of each configuration
runs in a fresh process (peak RSS is that process's own), one after another, and medians are reported.
Our configurations are exported into --work-dir first (reused when already exported from the same
checkpoint). Then, unless --no-accuracy, each quantized export (and `none-kv16`: float32 weights with
a float16 KV cache, the cache's own effect) is compared with our fp32 export, teacher-forced over
--accuracy-positions positions. Prints markdown tables (machine above them),
writes every raw repetition + medians to --json-out and a bar chart to --chart.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import artifacts, machine, report
from .worker import WorkerError, launch

ROOT = artifacts.ROOT
QUANTIZED = ("int8", "int4", "mixed")
COMPARED = ("none-kv16",) + QUANTIZED  # compared with "none" (fp32 weights, fp32 KV cache) for accuracy
OURS = ("none",) + COMPARED
ALL_CONFIGS = ("eager-fp32", "eager-bf16") + OURS
DEFAULT_PROMPT = ("Look carefully at this photograph. Describe the person in it, what they are wearing, the objects "
                  "around them, and the colors of the background, in two sentences.")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(ROOT, "bench", "configs", "qwen3-vl-2b.json"),
                   help="a checkpoint folder, or a config.json made into a random-weight checkpoint "
                        "(default: bench/configs/qwen3-vl-2b.json)")
    p.add_argument("--image", help="the image (default: assets/astronaut.jpg resized to 448x448: 196 Qwen3-VL "
                                   "image tokens)")
    p.add_argument("--image-size", metavar="WxH",
                   help="resize the image (--image, or assets/astronaut.jpg) to WIDTHxHEIGHT pixels first, e.g. "
                        "512x512 or 1024x768 (a SmolVLM image is then resized to the processor's longest edge "
                        "and split into tiles)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the question (default: a ~30-token description request)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per run (default 32)")
    p.add_argument("--threads", type=int, default=2, help="threads for torch and ONNX Runtime (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration; medians reported (default 3)")
    p.add_argument("--warmup", type=int, choices=(0, 1), default=1,
                   help="1 (default): a 2-token generate before the timed one, in the same process (its TTFT "
                        "is kept as cold_ttft_s); 0: time the first call")
    p.add_argument("--configs", default=",".join(ALL_CONFIGS),
                   help=f"comma-separated subset of {','.join(ALL_CONFIGS)} (default: all)")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa",
                   help="transformers attention implementation for the eager baselines (default sdpa)")
    p.add_argument("--work-dir", default="bench-out", help="checkpoint, exports, logs, results (default bench-out/)")
    p.add_argument("--export-jobs", type=int, default=1,
                   help="exports run at once (default 1; more only for small models: each holds the model)")
    p.add_argument("--json-out", help="results JSON (default WORK/results.json)")
    p.add_argument("--chart", help="bar chart PNG (default WORK/results.png)")
    p.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=True,
                   help="teacher-forced accuracy of none-kv16/int8/int4/mixed vs our fp32 export (default on)")
    p.add_argument("--accuracy-positions", type=int, default=256, help="positions compared (default 256)")
    args = p.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(args.configs) - set(ALL_CONFIGS))
    if unknown or not args.configs:
        p.error(f"--configs: unknown {', '.join(unknown) or '(empty)'}; choose from {','.join(ALL_CONFIGS)}")
    for flag in ("new_tokens", "threads", "repeats", "accuracy_positions", "export_jobs"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (the decode rate needs a second token)")
    if args.image and not os.path.isfile(args.image):
        p.error(f"--image {args.image!r} is not a file")
    if args.image_size:
        try:
            args.image_size = artifacts.parse_size(args.image_size)
        except ValueError as e:
            p.error(f"--image-size: {e}")
    args.work_dir = os.path.abspath(args.work_dir)
    args.json_out = os.path.abspath(args.json_out or os.path.join(args.work_dir, "results.json"))
    args.chart = os.path.abspath(args.chart or os.path.join(args.work_dir, "results.png"))
    args.image = os.path.abspath(args.image) if args.image else None
    return args


def run_speed(args, checkpoint: str, folders: dict, image: str) -> dict:
    """Every repetition of every configuration, one process each, one after another."""
    results = {}
    common = {"image": image, "prompt": args.prompt, "new_tokens": args.new_tokens, "threads": args.threads,
              "warmup": args.warmup}
    for name in args.configs:
        if name.startswith("eager"):
            spec = dict(common, task="eager", checkpoint=checkpoint, attn=args.attn,
                        dtype="float32" if name == "eager-fp32" else "bfloat16")
        else:
            spec = dict(common, task="onnx", folder=folders[name])
        results[name] = {"kind": "eager" if name.startswith("eager") else "onnx", "spec": spec, "runs": []}
        for rep in range(args.repeats):
            log_path = os.path.join(args.work_dir, "logs", f"{name}-{rep + 1}.log")
            try:
                run = launch(spec, log_path, args.threads)
            except WorkerError as e:
                results[name]["error"] = str(e)
                artifacts.log(f"{name} #{rep + 1}: {e}")
                break
            results[name]["runs"].append(run)
            artifacts.log(f"{name} #{rep + 1}/{args.repeats}: load {run['load_s']:.3f} s, ttft {run['ttft_s']:.3f} s, "
                          f"decode {run['decode_tokens_per_s']:.1f} tok/s, peak RSS {run['peak_rss_mb']:.0f} MB")
    return results


def run_accuracy(args, folders: dict, image: str) -> dict:
    """Teacher-forced comparison of each quantized (or float16 KV) export with our fp32 export."""
    quantized = [name for name in args.configs if name in COMPARED]
    common = {"image": image, "prompt": args.prompt, "threads": args.threads}
    ref_dir = os.path.join(args.work_dir, "accuracy-reference")
    artifacts.log(f"accuracy: fp32 reference over {args.accuracy_positions} positions")
    try:
        ref = launch(dict(common, task="accuracy-reference", folder=folders["none"],
                          positions=args.accuracy_positions, out_dir=ref_dir),
                     os.path.join(args.work_dir, "logs", "accuracy-reference.log"), args.threads)
    except WorkerError as e:
        artifacts.log(f"accuracy: {e}")
        return {"reference": "none", "error": str(e), "configs": {}}
    accuracy = {"reference": "none", "positions": ref["positions"], "method": "teacher-forced on the fp32 greedy "
                "continuation (EOS masked)", "reference_tokens": ref["tokens"], "configs": {}}
    for name in quantized:
        try:
            accuracy["configs"][name] = launch(dict(common, task="accuracy-compare", folder=folders[name],
                                                    ref_dir=ref_dir),
                                               os.path.join(args.work_dir, "logs", f"accuracy-{name}.log"), args.threads)
        except WorkerError as e:
            accuracy["configs"][name] = {"error": str(e)}
        artifacts.log(f"accuracy: {name} done")
    return accuracy


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    started = time.time()
    host = machine.describe()
    checkpoint = artifacts.resolve_checkpoint(args.config, args.work_dir)
    if args.image and not args.image_size:
        image = args.image
    else:
        image = artifacts.default_image(args.work_dir, args.image_size, args.image)
    image_size = artifacts.image_size(image)
    with open(os.path.join(checkpoint, "config.json"), encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    quantized = [c for c in args.configs if c in COMPARED]
    accuracy_on = args.accuracy and bool(quantized)
    needed = [c for c in OURS if c in args.configs or (c == "none" and accuracy_on)]
    folders = artifacts.ensure_exports(checkpoint, needed, args.work_dir, args.export_jobs)

    results = report.summarize(run_speed(args, checkpoint, folders, image))
    accuracy = run_accuracy(args, folders, image) if accuracy_on else None

    prompt_tokens = {r["runs"][0]["prompt_tokens"] for r in results.values() if r.get("runs")}
    settings = {"config": os.path.abspath(args.config), "model_type": model_type, "checkpoint": checkpoint,
                "image": image, "image_size": image_size,
                "prompt": args.prompt, "prompt_tokens": sorted(prompt_tokens), "new_tokens": args.new_tokens,
                "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup, "attn": args.attn,
                "exports": folders, "eager_timing": "one generate() call: get_image_features wrapped (vision), "
                "LogitsProcessor timestamp (end of prefill), BaseStreamer timestamps (first token, decode rate)"}
    tables = [report.results_table(results)]
    if accuracy:
        tables.append(report.accuracy_table(accuracy))
    name = os.path.basename(os.path.normpath(args.config))
    image_tokens = {r["runs"][0]["image_tokens"] for r in results.values() if r.get("runs")}
    text = (f"## {name}: one {image_size[0]}x{image_size[1]} image, {'/'.join(map(str, sorted(prompt_tokens)))} "
            f"prompt tokens ({'/'.join(map(str, sorted(image_tokens)))} image), {args.new_tokens} new tokens, "
            f"{args.threads} "
            f"threads, median of {args.repeats} (warm-up {'on' if args.warmup else 'off'})\n\n"
            f"{machine.markdown(host)}\n\n" + "\n\n".join(tables))
    if len(prompt_tokens) > 1:
        text += "\n\nwarning: the configurations saw different prompt lengths: " + str(sorted(prompt_tokens))
    print(text)

    os.makedirs(os.path.dirname(args.json_out), exist_ok=True)
    with open(args.json_out, "w", encoding="utf-8") as f:
        json.dump({"machine": host, "settings": settings, "configs": results, "accuracy": accuracy,
                   "markdown": text, "started": started, "elapsed_s": time.time() - started}, f, indent=2)
        f.write("\n")
    os.makedirs(os.path.dirname(args.chart), exist_ok=True)
    report.chart(results, args.chart, f"{name} on {host['cpu']}, {args.threads} threads "
                                      f"(median of {args.repeats})")
    artifacts.log(f"wrote {args.json_out} and {args.chart}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
