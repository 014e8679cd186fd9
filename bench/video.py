"""A video question on the Qwen3-VL-2B shape: our export next to eager PyTorch, in one run.

    python -m bench.video --export EXPORT --checkpoint CHECKPOINT [--seconds 10] [--size 640x360]
                          [--repeats 2] [--out docs/bench-video-2b-int4.json]

Writes a clip (photographs panned and zoomed, H.264, --fps frames per second) and asks about it. Each run
is a fresh process (peak RSS is per process):
  * ours: frames used, video tokens, clip decoding (PyAV) + preprocessing time, vision time, time to
    first token (from the request to the first token: decode, preprocess, vision, prompt), decode tokens/s;
  * eager: transformers' Qwen3VLForConditionalGeneration (--eager-dtype, sdpa) given OUR pixel values, grid
    and prompt (transformers' video processor needs torchvision, which does not load here): vision time,
    time to first token from the model inputs (so without clip decoding), decode tokens/s.
The clip budget is the export's video_preprocessing; an export made before video support has none and
gets `QWEN3_VL_2B_VIDEO` (Qwen3-VL-2B-Instruct's video_preprocessor_config.json) for this benchmark.
Prints a table and writes JSON with medians of --repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from . import machine
from .report import write_json

QUESTION = "Describe what happens in this video, with the times."
QWEN3_VL_2B_VIDEO = {"size": {"longest_edge": 25165824, "shortest_edge": 4096}, "patch_size": 16,
                     "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                     "image_std": [0.5, 0.5, 0.5], "fps": 2}


def write_clip(path: str, seconds: float, width: int, height: int, fps: int) -> str:
    """An H.264 clip: a window panning across two photographs and zooming in."""
    import av
    import numpy as np
    from PIL import Image
    from skimage import data

    photos = [Image.fromarray(data.astronaut()), Image.fromarray(data.coffee())]
    frames = int(seconds * fps)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            photo = photos[(2 * i) // frames]
            progress = (i % (frames // 2 or 1)) / max(frames // 2 - 1, 1)
            scale = 1 - 0.4 * progress
            w, h = int(photo.width * scale), int(photo.width * scale * height / width)
            h = min(h, photo.height)
            left, top = int((photo.width - w) * progress), (photo.height - h) // 2
            frame = photo.crop((left, top, left + w, top + h)).resize((width, height))
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return path


def messages(clip: str) -> list:
    return [{"role": "user", "content": [{"type": "video", "video": clip}, {"type": "text", "text": QUESTION}]}]


def run_ours(spec: dict) -> dict:
    """One request on our runtime in this process."""
    from vlm_core.kernels.sampling import SamplingParams
    from vlm_core.kernels.video import load_video, probe_video
    from vlm_core.models.qwen3_vl.video import sample_frame_indices
    from vlm_core.runtime.model import VisionLanguageModel

    start = time.perf_counter()
    vlm = VisionLanguageModel(spec["export"], threads=spec["threads"], cache_mb=0)
    load_s = time.perf_counter() - start
    if "video_preprocessing" not in vlm.manifest:
        from vlm_core.models.qwen3_vl.video import VideoProcessorParams

        vlm.family.video_params = VideoProcessorParams.from_dict(QWEN3_VL_2B_VIDEO)
    params = vlm.family.video_params
    start = time.perf_counter()
    clip = load_video(spec["clip"], lambda info: sample_frame_indices(info, params))
    decode_s = time.perf_counter() - start
    start = time.perf_counter()
    prompt = vlm.prepare(messages(spec["clip"]), max_new_tokens=spec["new_tokens"])
    prepare_s = time.perf_counter() - start  # decode + preprocess + template + tokens
    timings = {}
    chunks, first, last, count = [], None, None, 0
    for chunk in vlm.stream_generate(prompt, SamplingParams(greedy=True), max_new_tokens=spec["new_tokens"],
                                     min_new_tokens=spec["new_tokens"], timings=timings):
        now = time.perf_counter()
        if chunk.token_id is not None:
            count += 1
            first = first or now
            last = now
            chunks.append(chunk.token_id)
    submitted = timings["submitted"]
    video_tokens = int((prompt.input_ids == vlm.family.video_token_id).sum())
    return {"load_s": load_s, "frames": len(clip.frame_indices), "clip_size": list(clip.frames.shape[1:3]),
            "grid_thw": prompt.media_grid.tolist(), "video_tokens": video_tokens,
            "prompt_tokens": len(prompt.input_ids), "clip_decode_s": decode_s, "prepare_s": prepare_s,
            "vision_s": timings["vision_s"], "prefill_s": timings["prefill_s"],
            "ttft_s": prepare_s + (first - submitted), "decode_tokens_per_s": (count - 1) / (last - first),
            "token_ids": chunks, "inputs": spec.get("save_inputs") and _save(prompt, vlm, spec["save_inputs"]),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _save(prompt, vlm, path: str) -> str:
    import numpy as np

    arrays = prompt.dump()
    types = np.zeros_like(arrays["input_ids"])
    types[arrays["input_ids"] == vlm.family.video_token_id] = 2
    np.savez(path, mm_token_type_ids=types, **arrays)
    return path


def run_eager(spec: dict) -> dict:
    """transformers given our inputs, in this process: vision, time to first token, decode rate."""
    import numpy as np
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from .eager import Clock

    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    model = Qwen3VLForConditionalGeneration.from_pretrained(
        spec["checkpoint"], dtype=getattr(torch, spec["dtype"]), attn_implementation="sdpa").eval()
    load_s = time.perf_counter() - start
    arrays = np.load(spec["inputs"])
    inputs = {"input_ids": torch.from_numpy(arrays["input_ids"]),
              "attention_mask": torch.ones_like(torch.from_numpy(arrays["input_ids"])),
              "pixel_values_videos": torch.from_numpy(arrays["pixel_values_videos"]).to(model.dtype),
              "video_grid_thw": torch.from_numpy(arrays["video_grid_thw"]),
              "mm_token_type_ids": torch.from_numpy(arrays["mm_token_type_ids"])}
    clock = Clock(model)
    with torch.inference_mode():
        tokens, timings = clock.generate(model, inputs, spec["new_tokens"])
    return {"load_s": load_s, **timings, "token_ids": tokens,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _worker(kind: str, spec: dict) -> dict:
    cmd = [sys.executable, "-m", "bench.video", "--worker", kind, json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    if out.returncode:
        raise RuntimeError(f"{kind} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--export", help="the exported model folder (required)")
    p.add_argument("--checkpoint", help="the checkpoint the export came from (eager PyTorch); omitted: ours only")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--size", default="640x360")
    p.add_argument("--fps", type=int, default=30, help="the clip's own frame rate")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--eager-dtype", default="bfloat16")
    p.add_argument("--out", default="bench-out/bench-video.json")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        kind, spec = args.worker[0], json.loads(args.worker[1])
        print(json.dumps(run_ours(spec) if kind == "ours" else run_eager(spec)))
        return
    if not args.export:
        p.error("--export is required")
    width, height = (int(v) for v in args.size.split("x"))
    work = tempfile.mkdtemp(prefix="bench-video-")
    clip = write_clip(os.path.join(work, "clip.mp4"), args.seconds, width, height, args.fps)
    inputs = os.path.join(work, "inputs.npz")
    spec = {"export": args.export, "clip": clip, "threads": args.threads, "new_tokens": args.new_tokens}
    ours, eager = [], []
    for i in range(args.repeats):  # interleaved, fresh processes
        ours.append(_worker("ours", dict(spec, save_inputs=inputs if i == 0 else None)))
        if args.checkpoint:
            eager.append(_worker("eager", {"checkpoint": args.checkpoint, "dtype": args.eager_dtype, "inputs": inputs,
                                           "threads": args.threads, "new_tokens": args.new_tokens}))
        print(f"run {i + 1}/{args.repeats}: ours ttft {ours[-1]['ttft_s']:.1f} s"
              + (f", eager ttft {eager[-1]['ttft_s']:.1f} s" if eager else ""), file=sys.stderr)

    def median(runs, key):
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    keys = ("load_s", "clip_decode_s", "prepare_s", "vision_s", "prefill_s", "ttft_s", "decode_tokens_per_s",
            "peak_rss_mb")
    result = {"host": machine.describe(), "clip": {"seconds": args.seconds, "size": args.size, "fps": args.fps},
              "frames": ours[0]["frames"], "frame_size": ours[0]["clip_size"], "grid_thw": ours[0]["grid_thw"],
              "video_tokens": ours[0]["video_tokens"], "prompt_tokens": ours[0]["prompt_tokens"],
              "ours": {k: median(ours, k) for k in keys}, "eager": {k: median(eager, k) for k in keys} if eager else None,
              "eager_dtype": args.eager_dtype if eager else None,
              "same_tokens": eager[0]["token_ids"] == ours[0]["token_ids"] if eager else None, "runs": {"ours": ours, "eager": eager}}
    rows = [("frames used", result["frames"], ""), ("video tokens", result["video_tokens"], ""),
            ("prompt tokens", result["prompt_tokens"], "")]
    for key in keys:
        a, b = result["ours"][key], (result["eager"] or {}).get(key)
        rows.append((key, a, b))
    print(f"\nVideo, {args.seconds:g} s {args.size} clip, host: {machine.markdown(result['host'])}")
    print(f"| measure | ours | eager {args.eager_dtype} | ours / eager |\n|---|---|---|---|")
    for name, a, b in rows:
        ratio = f"{a / b:.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else ""
        fmt = (lambda v: f"{v:.2f}" if isinstance(v, float) else str(v if v is not None else ""))
        print(f"| {name} | {fmt(a)} | {fmt(b)} | {ratio} |")
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
