"""One timed run of eager PyTorch (transformers' Qwen3VLForConditionalGeneration or
SmolVLMForConditionalGeneration, picked by the checkpoint's model_type in FAMILIES) inside a bench worker.

How the eager figures are taken, all inside ONE `model.generate(...)` call (greedy, N new tokens):

* vision_s: `model.model.get_image_features` is wrapped for the run (signature kept), so the vision
  encoder is clocked where generate really calls it (transformers 5 encodes images just before the prefill);
* prefill_s: from the end of the vision encoder to the first logits reaching a `LogitsProcessor`
  (embedding splice, M-RoPE index, the language model over the prompt, lm_head);
* ttft_s: from the `generate` call to a `BaseStreamer` receiving the first new token
  (vision + prefill + first sample, plus generate's own setup);
* decode rate: (N - 1) / (time of the last streamed token - time of the first streamed token).

The prompt is built by the family's own transformers processor (Qwen3VLProcessor / SmolVLMProcessor, with
the PIL image processor, so no torchvision is needed) from the same chat messages our runtime gets.
"""
from __future__ import annotations

import functools
import json
import os
import time


def build_qwen3_vl_processor(checkpoint: str):
    """transformers' Qwen3VLProcessor for `checkpoint`, without the torchvision-only video processor."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    class Qwen3VLProcessorNoVideo(transformers.Qwen3VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    with open(os.path.join(checkpoint, "preprocessor_config.json"), encoding="utf-8") as f:
        params = json.load(f)
    keep = ("size", "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
    image_processor = Qwen2VLImageProcessorPil(**{k: params[k] for k in keep if k in params})
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    return Qwen3VLProcessorNoVideo(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                   chat_template=_chat_template(checkpoint, tokenizer))


def _chat_template(checkpoint: str, tokenizer) -> str | None:
    jinja = os.path.join(checkpoint, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    legacy = os.path.join(checkpoint, "chat_template.json")
    if os.path.isfile(legacy):
        with open(legacy, encoding="utf-8") as f:
            return json.load(f)["chat_template"]
    return getattr(tokenizer, "chat_template", None)


def build_smolvlm_processor(checkpoint: str):
    """transformers' SmolVLMProcessor for `checkpoint` (PIL image backend, a stand-in for the video processor)."""
    from .smolvlm import hf_processor

    return hf_processor(checkpoint)


# model_type -> (transformers model class name, processor builder)
FAMILIES = {"qwen3_vl": ("Qwen3VLForConditionalGeneration", build_qwen3_vl_processor),
            "smolvlm": ("SmolVLMForConditionalGeneration", build_smolvlm_processor)}


def family(checkpoint: str) -> tuple:
    """(model class name, processor builder) for the checkpoint's model_type; SystemExit naming the known ones."""
    with open(os.path.join(checkpoint, "config.json"), encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    if model_type not in FAMILIES:
        raise SystemExit(f"error: no eager baseline for model_type {model_type!r} in {checkpoint}; "
                         f"the bench knows {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


class Clock:
    """Timestamps of one generate call: vision encoder start/end, first logits, each streamed token."""

    def __init__(self, model):
        import torch
        from transformers import LogitsProcessor
        from transformers.generation.streamers import BaseStreamer

        self.vision, self.logits, self.tokens = [], [], []
        clock, encode = self, model.model.get_image_features

        @functools.wraps(encode)  # generate() reads the signature to call it before the prefill
        def timed_encode(*args, **kwargs):
            start = time.perf_counter()
            out = encode(*args, **kwargs)
            clock.vision.append((start, time.perf_counter()))
            return out

        model.model.get_image_features = timed_encode  # instance attribute: what forward() looks up

        class StampLogits(LogitsProcessor):
            def __call__(self, input_ids, scores: torch.Tensor) -> torch.Tensor:
                clock.logits.append(time.perf_counter())
                return scores

        class StampStreamer(BaseStreamer):
            prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:  # generate() first streams the prompt itself
                    self.prompt_seen = True
                    return
                clock.tokens.append(time.perf_counter())

            def end(self):
                pass

        self.processor_class, self.streamer_class = StampLogits, StampStreamer

    def generate(self, model, inputs, new_tokens: int):
        """Greedy generate with the clock attached; returns (new token ids, timings)."""
        from transformers import LogitsProcessorList

        self.vision, self.logits, self.tokens = [], [], []
        start = time.perf_counter()
        # use_cache explicitly: published SmolVLM configs say "use_cache": false (a training setting)
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             use_cache=True,
                             temperature=None, top_p=None, top_k=None,
                             logits_processor=LogitsProcessorList([self.processor_class()]),
                             streamer=self.streamer_class())
        vision_start, vision_end = self.vision[0]
        decode_s = self.tokens[-1] - self.tokens[0]
        timings = {"vision_s": vision_end - vision_start, "prefill_s": self.logits[0] - vision_end,
                   "ttft_s": self.tokens[0] - start,
                   "decode_tokens_per_s": (len(self.tokens) - 1) / decode_s if decode_s > 0 else None}
        return out[0, inputs["input_ids"].shape[1]:].tolist(), timings


def run(spec: dict) -> dict:
    """spec: checkpoint, dtype (float32|bfloat16), attn, image, prompt, new_tokens, threads, warmup."""
    start = time.perf_counter()
    import torch
    import transformers

    from .ours import messages

    import_s = time.perf_counter() - start
    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    class_name, build_processor = family(spec["checkpoint"])
    model = getattr(transformers, class_name).from_pretrained(
        spec["checkpoint"], dtype=getattr(torch, spec["dtype"]), attn_implementation=spec["attn"]).eval()
    processor = build_processor(spec["checkpoint"])
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    inputs = processor.apply_chat_template(messages(spec["image"], spec["prompt"]), tokenize=True,
                                           add_generation_prompt=True, return_dict=True, return_tensors="pt")
    preprocess_s = time.perf_counter() - start
    clock = Clock(model)
    cold_ttft_s = None
    with torch.inference_mode():
        if spec["warmup"]:
            cold_ttft_s = clock.generate(model, inputs, 2)[1]["ttft_s"]
        tokens, timings = clock.generate(model, inputs, spec["new_tokens"])
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    return {"import_s": import_s, "load_s": load_s, "preprocess_s": preprocess_s, **timings,
            "cold_ttft_s": cold_ttft_s, "token_ids": tokens, "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "image_tokens": image_tokens}
