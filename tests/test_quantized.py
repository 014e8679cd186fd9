"""The int8 and int4 configurations: they load and generate, and stay close to the fp32 graphs.

Agreement is measured teacher-forced: the fp32 export's greedy continuation is fed to each
quantized export one token at a time and the next-token logits are compared at every position.
The quantized exports keep their KV cache in float16 (the default for --quantize int8/int4/mixed).
Thresholds come from measurement on this tiny random model over 48 positions (int8: cosine 0.9997,
top-1 100% on an AMX host; 0.9990 on an AVX2-only host, where int8 weights are 7-bit (reduce_range,
see export/quantize.py); int4 block 32: cosine 0.975, top-1 98%) with a margin; random weights make 4-bit error
look larger than on trained weights, so these are floors against breakage, not quality claims.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from matmul_nbits_check import check_matmul_nbits

from bench.accuracy import cosine, greedy_without_eos, kl_divergence, teacher_forced
from vlm_core.kernels.sampling import SamplingParams
from vlm_core.runtime.model import VisionLanguageModel

POSITIONS = 48
FLOORS = {"int8": {"cosine": 0.998, "top1": 0.95, "vision_cosine": 0.999},
          "int4": {"cosine": 0.95, "top1": 0.85, "vision_cosine": 0.999},
          "mixed": {"cosine": 0.95, "top1": 0.85, "vision_cosine": 0.999}}  # decode steps are int4


def _messages(photos):
    return [{"role": "user", "content": [{"type": "image", "path": photos["astronaut"]},
                                         {"type": "text", "text": "Describe the picture."}]}]


@pytest.fixture(scope="module")
def fp32_reference(vlm, photos):
    prompt = vlm.prepare(_messages(photos))
    vision = vlm.encode_images(prompt)
    rows, tokens = [], []
    for logits in teacher_forced(vlm, prompt, vision, POSITIONS, lambda i, _: tokens[i]):
        rows.append(np.asarray(logits, np.float64))
        tokens.append(greedy_without_eos(vlm, logits))
    return {"logits": rows, "tokens": tokens, "image_embeds": vision[0]}


@pytest.mark.parametrize("method", ["int8", "int4", "mixed"])
def test_quantized_config_generates_and_agrees_with_fp32(method, request, photos, fp32_reference):
    folder = request.getfixturevalue(f"qwen_export_{method}")
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["quantization"]["method"] == method
    ops = manifest["quantization"]["decoder"]["ops"]
    assert ops.get("MatMulInteger" if method == "int8" else "MatMulNBits", 0) > 0
    if method == "mixed":  # the prompt runs through an int8 twin of the decoder
        assert manifest["quantization"]["prefill"]["ops"].get("MatMulInteger", 0) > 0
        assert set(manifest["graphs"]) == {"vision", "decoder", "prefill"}
    assert "MatMulInteger" in manifest["quantization"]["vision"]["ops"]
    assert manifest["embeddings"]["dtype"] == "int8"
    if method != "int8":  # the default 4-bit weights: symmetric round-to-nearest, blocks of 32, int8 activations
        record = manifest["quantization"]["decoder"]
        assert (record["algorithm"], record["block_size"], record["symmetric"]) == ("rtn", 32, True)
        check_matmul_nbits(os.path.join(folder, manifest["graphs"]["decoder"]["file"]), block_size=32,
                            zero_points=False)
    # quantized exports default to a float16 KV cache; the quantizers (prefill twin included) keep its I/O
    assert manifest["text_config"]["kv_dtype"] == "float16"
    for name in ("decoder", "prefill") if method == "mixed" else ("decoder",):
        graph = manifest["graphs"][name]
        assert {v["type"] for v in graph["inputs"] + graph["outputs"]
                if v["name"].startswith(("past_key_values.", "present."))} == {"float16"}, name

    model = VisionLanguageModel(folder, threads=2)
    result = model.generate(_messages(photos), SamplingParams(greedy=True), max_new_tokens=8, min_new_tokens=8)
    assert len(result.token_ids) == 8 and result.finish_reason == "length"

    prompt = model.prepare(_messages(photos))
    vision = model.encode_images(prompt)
    assert cosine(vision[0], fp32_reference["image_embeds"]) > FLOORS[method]["vision_cosine"]
    cosines, top1, kls = [], [], []
    tokens = fp32_reference["tokens"]
    for i, logits in enumerate(teacher_forced(model, prompt, vision, POSITIONS, lambda i, _: tokens[i])):
        expected = fp32_reference["logits"][i]
        cosines.append(cosine(logits, expected))
        top1.append(int(np.argmax(logits)) == int(np.argmax(expected)))
        kls.append(kl_divergence(expected, np.asarray(logits, np.float64)))
    print(f"{method}: cosine mean {np.mean(cosines):.5f} min {np.min(cosines):.5f}, "
          f"top-1 {np.mean(top1):.3f}, KL mean {np.mean(kls):.2e}")
    assert np.mean(cosines) > FLOORS[method]["cosine"]
    assert np.mean(top1) >= FLOORS[method]["top1"]
