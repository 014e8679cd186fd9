"""Summaries of the raw runs: medians, agreement and speed-ups, the markdown tables and the PNG chart."""
from __future__ import annotations

import json
import os
import statistics

METRICS = ("import_s", "load_s", "preprocess_s", "vision_s", "prefill_s", "ttft_s", "decode_tokens_per_s",
           "peak_rss_mb", "cold_ttft_s")
EAGER = ("eager-fp32", "eager-bf16")


def write_json(path: str, result: dict) -> None:
    """Write a benchmark's results to `path` (its folder made if missing), as every bench script does."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)


def medians(runs: list) -> dict:
    """The median of each metric over the repetitions (None where no run has it)."""
    out = {}
    for metric in METRICS:
        values = [run[metric] for run in runs if run.get(metric) is not None]
        out[metric] = statistics.median(values) if values else None
    return out


def agreement(tokens: list, reference: list) -> dict:
    """Length of the common greedy prefix with the reference tokens, out of the reference count."""
    same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
    return {"matching_prefix": same, "count": len(reference), "text": f"{same}/{len(reference)}"}


def summarize(results: dict) -> dict:
    """Add median, agreement (vs eager fp32, else our fp32) and ratios vs each eager baseline in place."""
    done = {name: r for name, r in results.items() if r.get("runs")}
    for r in done.values():
        r["median"] = medians(r["runs"])
        r["deterministic"] = all(run["token_ids"] == r["runs"][0]["token_ids"] for run in r["runs"])
    reference = next((name for name in ("eager-fp32", "none") if name in done), None)
    for name, r in done.items():
        if reference:
            r["agreement"] = dict(agreement(r["runs"][0]["token_ids"], done[reference]["runs"][0]["token_ids"]),
                                  reference=reference)
        r["ratios"] = {}
        for base in EAGER:
            if base not in done:
                continue
            b, m = done[base]["median"], r["median"]
            r["ratios"][base] = {
                "ttft_speedup": _ratio(b["ttft_s"], m["ttft_s"]),
                "decode_speedup": _ratio(m["decode_tokens_per_s"], b["decode_tokens_per_s"]),
                "peak_rss_ratio": _ratio(m["peak_rss_mb"], b["peak_rss_mb"])}
    return results


def _ratio(a, b):
    return a / b if a is not None and b else None


def _num(value, kind: str = "s") -> str:
    if value is None:
        return "-"
    if kind == "x":
        return f"{value:.2f}x"
    if kind == "int":
        return f"{value:.0f}"
    if kind == "rate":
        return f"{value:.1f}" if value < 1000 else f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def results_table(results: dict) -> str:
    """The speed/memory table (markdown): medians, speed-ups vs eager fp32 / bf16, token agreement."""
    header = ["config", "load s", "vision s", "prefill s", "TTFT s", "decode tok/s", "peak RSS MB",
              "TTFT speed-up vs eager fp32 / bf16", "decode speed-up vs eager fp32 / bf16", "RSS vs eager fp32",
              "greedy tokens = reference"]
    rows = []
    for name, r in results.items():
        if "median" not in r:
            rows.append([name, "failed: " + r.get("error", "?").splitlines()[0]] + [""] * (len(header) - 2))
            continue
        m, ratios = r["median"], r.get("ratios", {})
        pair = lambda key: " / ".join(_num(ratios.get(b, {}).get(key), "x") for b in EAGER)  # noqa: E731
        rows.append([name, _num(m["load_s"]), _num(m["vision_s"]), _num(m["prefill_s"]), _num(m["ttft_s"]),
                     _num(m["decode_tokens_per_s"], "rate"), _num(m["peak_rss_mb"], "int"),
                     pair("ttft_speedup"), pair("decode_speedup"),
                     _num(ratios.get("eager-fp32", {}).get("peak_rss_ratio"), "x"),
                     r.get("agreement", {}).get("text", "-")])
    return _markdown(header, rows)


def accuracy_table(accuracy: dict) -> str:
    """Teacher-forced agreement of each quantized (or float16 KV) export with our fp32 export (markdown)."""
    header = ["config", "KV cache", "positions", "image_embeds cos", "deepstack cos", "logits cos mean",
              "logits cos min", "top-1 agree %", "KL(fp32||q) mean", "KL max"]
    rows = []
    for name, a in accuracy.get("configs", {}).items():
        if "error" in a:
            rows.append([name, "failed: " + a["error"].splitlines()[0]] + [""] * (len(header) - 2))
            continue
        rows.append([name, a.get("kv_dtype", "float32"), str(a["positions"]), f"{a['image_embeds_cosine']:.6f}",
                     f"{a['deepstack_cosine']:.6f}" if "deepstack_cosine" in a else "-",
                     f"{a['logits_cosine_mean']:.6f}", f"{a['logits_cosine_min']:.6f}",
                     f"{a['top1_agreement_pct']:.1f}", f"{a['kl_mean']:.2e}", f"{a['kl_max']:.2e}"])
    return _markdown(header, rows)


def _markdown(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def chart(results: dict, path: str, title: str) -> None:
    """A PNG with three bar panels per configuration: TTFT (s), decode tok/s, peak RSS (MB)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, r in results.items() if "median" in r]
    colors = ["#9e9e9e" if name.startswith("eager") else "#1f77b4" for name in names]
    panels = (("ttft_s", "time to first token (s, lower is better)"),
              ("decode_tokens_per_s", "decode (tokens/s, higher is better)"),
              ("peak_rss_mb", "peak RSS (MB, lower is better)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    for ax, (metric, label) in zip(axes, panels):
        values = [results[name]["median"][metric] or 0.0 for name in names]
        bars = ax.bar(names, values, color=colors)
        ax.bar_label(bars, labels=[_num(v, "int" if metric == "peak_rss_mb" else "rate" if "tokens" in metric
                                        else "s") for v in values], fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.margins(y=0.15)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
