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
    assert "| ours (int4 export, default engine: a lone sequence decodes as one row) |" in proc.stdout
    assert "| ours (int4 export, batch_invariant=True: a lone sequence runs as 2 rows) |" in proc.stdout
    assert results["ours-invariant"]["median"]["decode_tokens_per_s"] > 0
    rates = [run["decode_tokens_per_s"] for run in ours["runs"]]  # the spread: min and max over the rounds
    assert (ours["median"]["decode_min"], ours["median"]["decode_max"]) == (min(rates), max(rates))
    assert [run["round"] for run in ours["runs"]] == [1, 2]
    assert "skipped: llama-bench not found" in proc.stdout


def test_ratios_are_taken_within_each_round():
    def run(n, decode, prefill):
        return {"round": n, "decode_tokens_per_s": decode, "prefill_tokens_per_s": prefill}
    results = {"ours": {"runs": [run(1, 10.0, 60.0), run(2, 5.0, 20.0)]},
               "genai": {"runs": [run(1, 8.0, 50.0), run(2, 5.0, 30.0)]},
               "llama.cpp": {"runs": [run(1, 4.0, 40.0), run(2, 10.0, 40.0)]}}
    ratios = peers.round_ratios(results)["ours"]
    assert ratios["decode_vs_fastest_peer"]["rounds"] == [1.25, 0.5]
    assert ratios["prefill_vs_llama_cpp"]["rounds"] == [1.5, 0.5]
    assert (ratios["decode_vs_fastest_peer"]["min"], ratios["decode_vs_fastest_peer"]["max"]) == (0.5, 1.25)
    for r in results.values():
        r["median"] = peers.median_row([dict(x, prompt_tokens=9, peak_rss_mb=1.0) for x in r["runs"]])
    assert "| 7.5 (5.0-10.0) | 1 | 0.88x (0.50-1.25) | 1.00x (0.50-1.50) |" in peers.table(results)


def test_tiny_ours_config_matches_the_tiny_peer_shape():
    config, shape = peers.ours_config("tiny"), peers.SHAPES["tiny"]
    text = config["text_config"]
    assert all(text[k] == shape[k] for k in ("hidden_size", "num_hidden_layers", "head_dim", "vocab_size"))
    assert sum(text["rope_scaling"]["mrope_section"]) == shape["head_dim"] // 2
    assert config["vision_config"]["out_hidden_size"] == shape["hidden_size"]
    assert peers.ours_config("full")["text_config"]["hidden_size"] == peers.SHAPES["full"]["hidden_size"]
