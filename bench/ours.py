"""One timed run of our runtime (an exported folder, ONNX Runtime, no torch) inside a bench worker.

Timings come from the runtime's own `generate_step` timings dict, unrounded:
vision_s (vision graph), prefill_s (prompt through the decoder), ttft_s (vision start to the first
token sampled: vision + prefill + first sample), decode rate = decode steps / decode_s, where decode_s
runs from the first token to the last decoder step.
"""
from __future__ import annotations

import time


def messages(image: str | None, prompt: str) -> list:
    """The one user turn every configuration answers: the image (none for a text-only run), then the question."""
    content = [{"type": "image", "path": image}] if image else []
    return [{"role": "user", "content": content + [{"type": "text", "text": prompt}]}]


def load(spec: dict):
    """spec's folder as a VisionLanguageModel with no prefix or image-feature cache (every repetition measures a
    first request, vision included); spec["batch_invariant"] False lets a lone sequence decode as one row."""
    from vlm_core.runtime.model import VisionLanguageModel

    return VisionLanguageModel(spec["folder"], threads=spec["threads"], cache_mb=0,
                               batch_invariant=spec.get("batch_invariant", True),
                               prepacked_cache=spec.get("prepacked_cache", True))


def timed_answer(vlm, prompt, spec: dict) -> dict:
    """spec["new_tokens"] greedy tokens for `prompt` (after a 2-token warm-up unless spec["warmup"] is 0):
    the runtime's timings, the decode rate, the tokens."""
    from vlm_core.kernels.sampling import SamplingParams

    greedy = SamplingParams(greedy=True)
    cold_ttft_s = None
    if spec.get("warmup", 1):  # a short first call pays one-time allocations; it is reported, not counted
        cold = {}
        list(vlm.generate_step(prompt, greedy, max_new_tokens=2, min_new_tokens=2, timings=cold))
        cold_ttft_s = cold["ttft_s"]
    n = spec["new_tokens"]
    timings = {}
    tokens = list(vlm.generate_step(prompt, greedy, max_new_tokens=n, min_new_tokens=n, timings=timings))
    steps, decode_s = timings.get("decode_steps", 0), timings.get("decode_s", 0.0)
    return {"vision_s": timings["vision_s"], "prefill_s": timings["prefill_s"], "ttft_s": timings["ttft_s"],
            "decode_tokens_per_s": steps / decode_s if decode_s > 0 else None, "cold_ttft_s": cold_ttft_s,
            "token_ids": tokens, "prompt_tokens": int(len(prompt.input_ids))}


def run(spec: dict) -> dict:
    """spec: folder, image (None: text only), prompt, new_tokens, threads, warmup[, batch_invariant].
    Returns timings and greedy tokens."""
    start = time.perf_counter()
    import vlm_core.runtime.model  # noqa: F401  (timed: the import cost is reported)

    import_s = time.perf_counter() - start
    start = time.perf_counter()
    vlm = load(spec)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    prompt = vlm.prepare(messages(spec["image"], spec["prompt"]))
    preprocess_s = time.perf_counter() - start
    return {"import_s": import_s, "load_s": load_s, "preprocess_s": preprocess_s, **timed_answer(vlm, prompt, spec),
            "image_tokens": int(prompt.image_tokens)}
