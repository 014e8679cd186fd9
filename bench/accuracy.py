"""Teacher-forced accuracy of quantized (or float16 KV cache) exports against our float32 export, on the
bench's prompt.

`reference` (worker task "accuracy-reference") runs the float32 folder greedily for P positions
(EOS masked so the run never stops early) and saves, per position, the logits it predicted from,
plus the greedy tokens and the vision outputs. `compare` ("accuracy-compare") feeds the SAME tokens
to a quantized folder one decode step at a time and compares its logits position by position:
cosine similarity (mean/min), top-1 agreement, KL(fp32 || quantized); and the vision encoder's
image_embeds (and deepstack) cosine separately; the compared folder's KV cache dtype is reported with
them. Both run in worker processes, one model each.
"""
from __future__ import annotations

import os

import numpy as np

REFERENCE_FILES = ("logits.npy", "tokens.npy", "image_embeds.npy", "deepstack_embeds.npy")


def _load(spec: dict):
    from vlm_core.runtime.model import VisionLanguageModel

    from .ours import messages

    vlm = VisionLanguageModel(spec["folder"], threads=spec["threads"])
    prompt = vlm.prepare(messages(spec["image"], spec["prompt"]))
    vlm.check_context(len(prompt.input_ids), spec["positions"])
    return vlm, prompt


def teacher_forced(vlm, prompt, vision, steps: int, next_token):
    """Yield the logits of `steps` positions; `next_token(i, logits)` picks the token fed after position i."""
    cache = vlm.new_cache(len(prompt.input_ids) + steps)
    logits = vlm.prefill(prompt, cache, vision)
    for i in range(steps):
        yield logits
        if i < steps - 1:
            token = next_token(i, logits)
            logits = vlm.run_decoder(vlm.family.decode_feeds(prompt, vlm.embed([token])[0], cache.offset), cache)


def greedy_without_eos(vlm, logits) -> int:
    masked = np.array(logits, dtype=np.float32)
    masked[vlm.eos_token_ids] = -np.inf
    return int(np.argmax(masked))


def reference(spec: dict) -> dict:
    """spec: folder (float32 export), image, prompt, positions, threads, out_dir. Saves the reference."""
    vlm, prompt = _load(spec)
    vision = vlm.encode_images(prompt)
    rows, tokens = [], []
    for logits in teacher_forced(vlm, prompt, vision, spec["positions"], lambda i, _: tokens[i]):
        rows.append(np.asarray(logits, np.float32))
        tokens.append(greedy_without_eos(vlm, logits))
    os.makedirs(spec["out_dir"], exist_ok=True)
    for name, array in zip(REFERENCE_FILES, (np.stack(rows), np.array(tokens, np.int64), *vision)):
        np.save(os.path.join(spec["out_dir"], name), array)
    return {"positions": len(tokens), "prompt_tokens": int(len(prompt.input_ids)), "tokens": tokens}


def compare(spec: dict) -> dict:
    """spec: folder (quantized export), image, prompt, threads, ref_dir. Returns the agreement figures."""
    ref = {name[:-4]: np.load(os.path.join(spec["ref_dir"], name), mmap_mode="r") for name in REFERENCE_FILES}
    tokens = np.asarray(ref["tokens"])
    vlm, prompt = _load(dict(spec, positions=len(tokens)))
    vision = vlm.encode_images(prompt)
    cosines, kls, top1 = [], [], []
    for i, logits in enumerate(teacher_forced(vlm, prompt, vision, len(tokens), lambda i, _: int(tokens[i]))):
        expected, actual = np.asarray(ref["logits"][i], np.float64), np.asarray(logits, np.float64)
        cosines.append(cosine(actual, expected))
        kls.append(kl_divergence(expected, actual))
        top1.append(int(np.argmax(actual)) == int(np.argmax(expected)))
    figures = {"positions": len(cosines), "kv_dtype": vlm.manifest["text_config"].get("kv_dtype", "float32"),
               "image_embeds_cosine": cosine(vision[0], ref["image_embeds"]),
               "logits_cosine_mean": float(np.mean(cosines)), "logits_cosine_min": float(np.min(cosines)),
               "top1_agreement_pct": 100.0 * float(np.mean(top1)), "kl_mean": float(np.mean(kls)),
               "kl_max": float(np.max(kls))}
    if np.asarray(vision[1]).size:
        figures["deepstack_cosine"] = cosine(vision[1], ref["deepstack_embeds"])
    return figures


def cosine(a, b) -> float:
    """Cosine similarity of two arrays, flattened, in float64."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / ((np.linalg.norm(a) * np.linalg.norm(b)) or 1.0))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(softmax(p) || softmax(q)) in nats."""
    log_p, log_q = log_softmax(p_logits), log_softmax(q_logits)
    return float(np.sum(np.exp(log_p) * (log_p - log_q)))
