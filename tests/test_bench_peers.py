"""`python -m bench.peers` without the peers installed: ours measured, GenAI and llama.cpp skipped with a reason."""
from __future__ import annotations

import json
import subprocess
import sys

from bench import peers

ROOT = peers.ROOT


def test_peers_skips_missing_peers_and_measures_ours(qwen_export_int4, tmp_path):
    out = tmp_path / "peers.json"
    proc = subprocess.run([sys.executable, "-m", "bench.peers", "--shape", "tiny", "--ours", qwen_export_int4,
                           "--genai-python", str(tmp_path / "no-python"), "--llama-bench", str(tmp_path / "no-bench"),
                           "--prompt-tokens", "40", "--new-tokens", "4", "--rounds", "2",
                           "--work-dir", str(tmp_path / "work"), "--json-out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text(encoding="utf-8"))["peers"]
    assert "onnxruntime-genai not importable" in results["genai"]["skipped"]
    assert "llama-bench not found" in results["llama.cpp"]["skipped"]
    ours = results["ours"]
    assert len(ours["runs"]) == 2 and 30 <= ours["median"]["prompt_tokens"] <= 40
    assert ours["median"]["decode_tokens_per_s"] > 0 and ours["median"]["peak_rss_mb"] > 0
    assert "| ours (int4 export; default batch-invariant engine" in proc.stdout
    assert "| ours (int4 export, batch_invariant=False: one row) |" in proc.stdout
    assert results["ours-one-row"]["median"]["decode_tokens_per_s"] > 0
    assert "skipped: llama-bench not found" in proc.stdout


def test_tiny_ours_config_matches_the_tiny_peer_shape():
    config, shape = peers.ours_config("tiny"), peers.SHAPES["tiny"]
    text = config["text_config"]
    assert all(text[k] == shape[k] for k in ("hidden_size", "num_hidden_layers", "head_dim", "vocab_size"))
    assert sum(text["rope_scaling"]["mrope_section"]) == shape["head_dim"] // 2
    assert config["vision_config"]["out_hidden_size"] == shape["hidden_size"]
    assert peers.ours_config("full")["text_config"]["hidden_size"] == peers.SHAPES["full"]["hidden_size"]
