"""Check an exported folder against eager-PyTorch reference outputs, through the real runtime."""
from __future__ import annotations

import numpy as np

from runtime.engine import VisionLanguageModel

LOGITS_RTOL = 1e-4
FEATURES_RTOL = 1e-4


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |a - e| / max |e|: one number for a whole tensor, robust to near-zero entries."""
    scale = float(np.abs(expected).max()) or 1.0
    return float(np.abs(np.asarray(actual, np.float64) - expected).max() / scale)


def check_parity(folder: str, reference: dict, logits_rtol: float = LOGITS_RTOL,
                 features_rtol: float = FEATURES_RTOL) -> dict:
    """Run the folder's graphs on the reference inputs; return the agreement figures and `passed`."""
    model = VisionLanguageModel(folder)
    image_embeds, deepstack = model.sessions["vision"].run(None, reference["vision_feeds"])
    figures = {"image_embeds_rel_err": relative_error(image_embeds, reference["image_embeds"])}
    if reference["deepstack_embeds"].size:
        figures["deepstack_rel_err"] = relative_error(deepstack, reference["deepstack_embeds"])
    prompt = model.family.prepare(reference["input_ids"], reference["pixel_values"], reference["image_grid_thw"])
    logits = model.prefill(prompt)  # first-step logits: the prefill alone
    figures["first_logits_rel_err"] = relative_error(logits, reference["first_logits"])
    expected = reference["tokens"]
    tokens = []
    for token in model.generate_step(prompt, max_new_tokens=len(expected), min_new_tokens=len(expected)):
        tokens.append(token)
    figures["greedy_tokens"] = len(expected)
    figures["greedy_tokens_equal"] = tokens == expected
    figures["passed"] = bool(tokens == expected and figures["first_logits_rel_err"] <= logits_rtol
                             and all(v <= features_rtol for k, v in figures.items() if k.endswith("_rel_err")
                                     and k != "first_logits_rel_err"))
    return {k: (round(v, 9) if isinstance(v, float) else v) for k, v in figures.items()}
