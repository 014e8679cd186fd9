"""What the shared family test runner (tests/test_families.py) needs to know about each family: which session
fixtures hold its tiny export and transformers' reference, and how transformers builds the reference inputs
for a conversation. Adding a family to the runner is one `FamilyCase` in `CASES`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class FamilyCase:
    name: str
    export: str  # session fixture: the exported tiny model folder
    reference: str  # session fixture: what `hf_inputs` needs from transformers (model, processor, ...)
    # (reference fixture value, messages, image paths) -> (eager model, the keyword inputs of its forward/generate)
    hf_inputs: Callable


def _processor_inputs(reference, messages, paths) -> tuple:
    """Families with a transformers processor (Qwen3-VL, SmolVLM): reference = (model, processor)."""
    model, processor = reference
    inputs = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True,
                                           return_tensors="pt")
    return model, dict(inputs)


def _minigpt4_inputs(reference, messages, paths):
    """MiniGPT-4 has no transformers processor: its prompt as MiniGPT-4's Chat writes it (build_prompt), ids as
    its get_context_emb makes them, pixels from transformers' BlipImageProcessor (PIL backend); text only runs
    the LLaMA text model alone (BLIP-2's forward needs pixels)."""
    from PIL import Image
    from test_minigpt4 import blip_processor, minigpt4_context_ids

    from minigpt4_helpers import build_prompt

    model, tokenizer = reference
    question = messages[-1]["content"][-1]["text"]
    ids = minigpt4_context_ids(tokenizer, build_prompt(question, len(paths)), len(paths),
                               model.config.image_token_index)
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    if not paths:
        return model.language_model, inputs
    processor = blip_processor(model.config.vision_config.image_size)
    inputs["pixel_values"] = processor([Image.open(p).convert("RGB") for p in paths],
                                       return_tensors="pt")["pixel_values"]
    return model, inputs


CASES = [
    FamilyCase("qwen3_vl", export="qwen_export", reference="qwen_reference", hf_inputs=_processor_inputs),
    FamilyCase("minigpt4", export="mg_export", reference="mg_reference", hf_inputs=_minigpt4_inputs),
    FamilyCase("smolvlm", export="smolvlm_export", reference="smolvlm_hf", hf_inputs=_processor_inputs),
]
