"""One timed run of our runtime (an exported folder, ONNX Runtime, no torch) inside a bench worker.

Timings come from the runtime's own `generate_step` timings dict, unrounded:
vision_s (vision graph), prefill_s (prompt through the decoder), ttft_s (vision start to the first
token sampled: vision + prefill + first sample), decode rate = decode steps / decode_s, where decode_s
runs from the first token to the last decoder step.
"""
from __future__ import annotations

import time


def messages(image: str, prompt: str) -> list:
    """The one user turn every configuration answers: the image, then the question."""
    return [{"role": "user", "content": [{"type": "image", "path": image}, {"type": "text", "text": prompt}]}]


def run(spec: dict) -> dict:
    """spec: folder, image, prompt, new_tokens, threads, warmup. Returns timings and greedy tokens."""
    start = time.perf_counter()
    from kernels.sampling import SamplingParams
    from runtime.engine import VisionLanguageModel

    import_s = time.perf_counter() - start
    start = time.perf_counter()
    # No prefix or image-feature cache: every repetition measures a first request (vision included).
    vlm = VisionLanguageModel(spec["folder"], threads=spec["threads"], cache_mb=0)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    prompt = vlm.prepare(messages(spec["image"], spec["prompt"]))
    preprocess_s = time.perf_counter() - start
    greedy = SamplingParams(greedy=True)
    cold_ttft_s = None
    if spec["warmup"]:  # a short first call pays one-time allocations; it is reported, not counted
        cold = {}
        list(vlm.generate_step(prompt, greedy, max_new_tokens=2, min_new_tokens=2, timings=cold))
        cold_ttft_s = cold["ttft_s"]
    n = spec["new_tokens"]
    timings = {}
    tokens = list(vlm.generate_step(prompt, greedy, max_new_tokens=n, min_new_tokens=n, timings=timings))
    steps, decode_s = timings.get("decode_steps", 0), timings.get("decode_s", 0.0)
    return {"import_s": import_s, "load_s": load_s, "preprocess_s": preprocess_s,
            "vision_s": timings["vision_s"], "prefill_s": timings["prefill_s"], "ttft_s": timings["ttft_s"],
            "decode_tokens_per_s": steps / decode_s if decode_s > 0 else None, "cold_ttft_s": cold_ttft_s,
            "token_ids": tokens, "prompt_tokens": int(len(prompt.input_ids)), "image_tokens": int(prompt.image_tokens)}
