"""`python -m bench` end to end on the tiny checkpoint: every configuration measured, JSON and chart written."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("eager-fp32", "eager-bf16", "none", "none-kv16", "int8", "int4")
MEDIANS = ("load_s", "vision_s", "prefill_s", "ttft_s", "decode_tokens_per_s", "peak_rss_mb")


def test_bench_runs_every_configuration(qwen_checkpoint, qwen_export, qwen_export_kv16, qwen_export_int8,
                                        qwen_export_int4, tmp_path):
    work = tmp_path / "bench"
    # The session's exports of the same checkpoint are reused (their manifests name the checkpoint).
    for name, folder in (("none", qwen_export), ("none-kv16", qwen_export_kv16), ("int8", qwen_export_int8),
                         ("int4", qwen_export_int4)):
        shutil.copytree(folder, work / name)
    proc = subprocess.run([sys.executable, "-m", "bench", "--config", qwen_checkpoint, "--work-dir", str(work),
                           "--repeats", "1", "--new-tokens", "4", "--accuracy-positions", "8", "--export-jobs", "2",
                           "--configs", ",".join(CONFIGS)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(work / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    assert list(results["configs"]) == list(CONFIGS)
    for name in CONFIGS:
        config = results["configs"][name]
        assert len(config["runs"]) == 1 and "error" not in config
        for metric in MEDIANS:
            value = config["median"][metric]
            assert isinstance(value, (int, float)) and value > 0, (name, metric, value)
        assert config["runs"][0]["image_tokens"] > 0
        assert len(config["runs"][0]["token_ids"]) == 4
    assert results["configs"]["none"]["agreement"]["text"] == "4/4"  # fp32 export reproduces eager fp32
    # every config's speed-ups against each eager baseline, from the recorded medians (baseline / ours for
    # TTFT, ours / baseline for decode rate and memory; a baseline against itself is 1 by construction: skipped)
    for name in CONFIGS:
        ours = results["configs"][name]["median"]
        for base in {"eager-fp32", "eager-bf16"} - {name}:
            theirs, ratios = results["configs"][base]["median"], results["configs"][name]["ratios"][base]
            assert ratios["ttft_speedup"] == pytest.approx(theirs["ttft_s"] / ours["ttft_s"]), (name, base)
            assert ratios["decode_speedup"] == pytest.approx(ours["decode_tokens_per_s"]
                                                             / theirs["decode_tokens_per_s"]), (name, base)
            assert ratios["peak_rss_ratio"] == pytest.approx(ours["peak_rss_mb"] / theirs["peak_rss_mb"]), (name, base)
    assert set(results["accuracy"]["configs"]) == {"none-kv16", "int8", "int4"}
    for figures in results["accuracy"]["configs"].values():
        assert figures["positions"] == 8 and 0.9 < figures["logits_cosine_mean"] <= 1.0 + 1e-9
        assert 0.0 <= figures["top1_agreement_pct"] <= 100.0 and figures["kl_mean"] >= -1e-9
        assert figures["kv_dtype"] == "float16"  # none-kv16 by choice, the quantized ones by default
    assert results["accuracy"]["configs"]["none-kv16"]["logits_cosine_mean"] > 0.9999
    assert results["machine"]["cpu"] and results["machine"]["versions"]["onnxruntime"]
    assert "reusing" in proc.stderr and "exporting" not in proc.stderr
    assert "| none |" in proc.stdout and "| int4 |" in proc.stdout and "| none-kv16 | float16 |" in proc.stdout
    with open(work / "results.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bench_smolvlm_checkpoint_and_eager_baseline(tmp_path):
    """The SmolVLM side of the bench short of exporting (minutes): a config in the published SmolVLM2 layout
    (image_token_id 49190, vocabulary 49280) becomes a checkpoint whose tokenizer puts <image> at 49190, and the
    eager worker times transformers' SmolVLMForConditionalGeneration on a 1024x768 image split into tiles."""
    import torch

    from bench import artifacts, eager, smolvlm

    with open(os.path.join(ROOT, "bench", "configs", "smolvlm2-256m.json"), encoding="utf-8") as f:
        config = json.load(f)
    config["text_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16)
    config["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=64, patch_size=8, max_image_size={"longest_edge": 64},
                                   size={"longest_edge": 128})
    config["scale_factor"] = 2
    checkpoint = smolvlm.write_checkpoint(str(tmp_path / "ckpt"), config, torch.bfloat16, log=lambda m: None)
    with open(os.path.join(checkpoint, "preprocessor_config.json"), encoding="utf-8") as f:
        assert json.load(f)["size"] == {"longest_edge": 128}
    image = artifacts.default_image(str(tmp_path), artifacts.parse_size("1024x768"))
    run = eager.run({"checkpoint": checkpoint, "dtype": "float32", "attn": "sdpa", "image": image,
                     "prompt": "Describe it.", "new_tokens": 2, "threads": 2, "warmup": 0})
    # 1024x768 -> 128x96 on the longest edge -> 2 x 2 tiles of 64 px + the global image, 16 tokens each
    assert run["image_tokens"] == 5 * 16 and len(run["token_ids"]) == 2
    assert run["vision_s"] > 0 and run["ttft_s"] >= run["vision_s"]
