"""MiniGPT-4's original files -> a BLIP-2-layout transformers checkpoint folder (then exported as usual).

Inputs, as Vision-CAIR/MiniGPT-4 loads them (minigpt4/models/mini_gpt4.py, LAVIS blip2.py / eva_vit.py):

1. the EVA ViT-g weights (eva_vit_g.pth: keys cls_token, pos_embed, patch_embed.proj.*, blocks.{i}.*),
   loaded into `visual_encoder` with the last block unused (LAVIS builds 39 of EVA-CLIP-g's 40 blocks);
2. BLIP-2's Q-Former checkpoint (blip2_pretrained*.pth, {"model": ...}): ln_vision.*, query_tokens,
   Qformer.bert.* (its text-only parts -- word/position embeddings, layer.{i}.intermediate/output,
   cls -- are the ones MiniGPT-4 deletes and are ignored); loaded after (1), so any visual_encoder.*
   it holds wins, as in MiniGPT-4;
3. the MiniGPT-4 checkpoint (pretrained_minigpt4*.pth, {"model": ...}) with llama_proj.*, loaded last;
4. the Vicuna / LLaMA folder (Hugging Face format: config.json, weights, tokenizer).

Every tensor goes through an explicit table (LAVIS name -> transformers Blip2 name) and is checked
against the shape the Blip2 model needs; EVA's separate q_bias and v_bias become the fused qkv bias
(q_bias, zeros for the key, v_bias). A missing or misshaped tensor stops the conversion with its name.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil

import torch

from vlm_core.export.errors import ExportError

EVA_HEAD_DIM = 88  # EVA ViT-g: 1408 wide, 16 heads
QFORMER_HEAD_DIM = 64  # BERT-base: 768 wide, 12 heads
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")


class ConversionError(ExportError, ValueError):
    """A MiniGPT-4 source file is missing, unreadable, or lacks / misshapes a tensor (named in the message).

    Also a ValueError, as it was before export errors had one root."""


def _load(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise ConversionError(f"{what} {path!r} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # checkpoints that pickle a config object beside the weights
                state = torch.load(path, map_location="cpu", weights_only=False)
    except ConversionError:
        raise
    except Exception as e:
        raise ConversionError(f"{what} {path!r} cannot be read ({type(e).__name__}: {e})") from None
    for key in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConversionError(f"{what} {path!r} holds no state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def merged_state(vit: str, qformer: str, proj: str) -> tuple[dict, dict]:
    """LAVIS-named tensors in MiniGPT-4's load order, and which file each came from."""
    state, origin = {}, {}
    for path, what, prefix in ((vit, "EVA ViT checkpoint", "visual_encoder."), (qformer, "Q-Former checkpoint", ""),
                               (proj, "MiniGPT-4 checkpoint", "")):
        for key, value in _load(path, what).items():
            if prefix and not key.startswith(prefix):
                key = prefix + key
            state[key], origin[key] = value, f"{what} {os.path.basename(path)}"
    return state, origin


def _count(state: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in state for m in [re.match(pattern, k)] if m}
    return max(found) + 1 if found else 0


def _need(state: dict, key: str, files: str):
    if key not in state:
        raise ConversionError(f"missing tensor {key!r} (expected in the {files})")
    return state[key]


def infer_config(state: dict, llm_config: dict, vit_depth: int | None = None, vit_heads: int | None = None,
                 qformer_heads: int | None = None) -> dict:
    """A Blip2Config dict from the tensors' shapes (EVA / BERT head sizes unless given)."""
    v = "EVA ViT checkpoint"
    cls = _need(state, "visual_encoder.cls_token", v)
    width = int(cls.shape[-1])
    patch = int(_need(state, "visual_encoder.patch_embed.proj.weight", v).shape[-1])
    positions = int(_need(state, "visual_encoder.pos_embed", v).shape[1])
    grid = int(round((positions - 1) ** 0.5))
    if grid * grid != positions - 1:
        raise ConversionError(f"tensor 'visual_encoder.pos_embed' has {positions} positions, not 1 + a square")
    blocks = _count(state, r"visual_encoder\.blocks\.(\d+)\.")
    depth = blocks - 1 if vit_depth is None else vit_depth  # LAVIS: EVA-CLIP-g's last block is not used
    if not 0 < depth <= blocks:
        raise ConversionError(f"the EVA ViT checkpoint has {blocks} blocks; cannot use {depth}")
    if vit_heads is None and width % EVA_HEAD_DIM:
        raise ConversionError(f"EVA width {width} is not a multiple of {EVA_HEAD_DIM}; give the number of ViT heads")
    q = "Q-Former checkpoint"
    query_tokens = _need(state, "query_tokens", q)
    q_width = int(query_tokens.shape[-1])
    q_layers = _count(state, r"Qformer\.bert\.encoder\.layer\.(\d+)\.")
    cross = [i for i in range(q_layers) if f"Qformer.bert.encoder.layer.{i}.crossattention.self.query.weight" in state]
    if not cross:
        raise ConversionError("missing tensor 'Qformer.bert.encoder.layer.0.crossattention.self.query.weight' "
                              "(expected in the Q-Former checkpoint)")
    frequency = cross[1] - cross[0] if len(cross) > 1 else q_layers
    if cross != list(range(0, q_layers, frequency)):
        raise ConversionError(f"Q-Former cross-attention layers {cross} are not every {frequency}th layer")
    if qformer_heads is None and q_width % QFORMER_HEAD_DIM:
        raise ConversionError(f"Q-Former width {q_width} is not a multiple of {QFORMER_HEAD_DIM}; give its heads")
    return {
        "model_type": "blip-2", "architectures": ["Blip2ForConditionalGeneration"],
        "num_query_tokens": int(query_tokens.shape[1]), "image_token_index": 0,
        "vision_config": {
            "hidden_size": width, "num_hidden_layers": depth, "image_size": grid * patch, "patch_size": patch,
            "num_attention_heads": vit_heads or width // EVA_HEAD_DIM,
            "intermediate_size": int(_need(state, "visual_encoder.blocks.0.mlp.fc1.weight", v).shape[0]),
            "layer_norm_eps": 1e-6, "qkv_bias": True, "hidden_act": "gelu"},
        "qformer_config": {
            "hidden_size": q_width, "num_hidden_layers": q_layers, "cross_attention_frequency": frequency,
            "num_attention_heads": qformer_heads or q_width // QFORMER_HEAD_DIM, "encoder_hidden_size": width,
            "intermediate_size": int(_need(state, "Qformer.bert.encoder.layer.0.intermediate_query.dense.weight",
                                           q).shape[0]),
            "layer_norm_eps": 1e-12, "hidden_act": "gelu"},
        "text_config": llm_config,
    }


def key_table(config: dict) -> list[tuple[str, tuple[str, ...]]]:
    """(transformers Blip2 name, LAVIS source names): one source is copied, (q_bias, v_bias) are fused."""
    table = [("vision_model.embeddings.class_embedding", ("visual_encoder.cls_token",)),
             ("vision_model.embeddings.position_embedding", ("visual_encoder.pos_embed",)),
             ("vision_model.embeddings.patch_embedding.weight", ("visual_encoder.patch_embed.proj.weight",)),
             ("vision_model.embeddings.patch_embedding.bias", ("visual_encoder.patch_embed.proj.bias",)),
             ("vision_model.post_layernorm.weight", ("ln_vision.weight",)),
             ("vision_model.post_layernorm.bias", ("ln_vision.bias",)),
             ("query_tokens", ("query_tokens",)),
             ("qformer.layernorm.weight", ("Qformer.bert.embeddings.LayerNorm.weight",)),
             ("qformer.layernorm.bias", ("Qformer.bert.embeddings.LayerNorm.bias",)),
             ("language_projection.weight", ("llama_proj.weight",)),
             ("language_projection.bias", ("llama_proj.bias",))]
    for i in range(config["vision_config"]["num_hidden_layers"]):
        src, dst = f"visual_encoder.blocks.{i}.", f"vision_model.encoder.layers.{i}."
        table.append((dst + "self_attn.qkv.bias", (src + "attn.q_bias", src + "attn.v_bias")))
        for a, b in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.proj", "self_attn.projection"),
                     ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            table += [(f"{dst}{b}.{p}", (f"{src}{a}.{p}",)) for p in ("weight", "bias")]
        table.append((dst + "self_attn.qkv.weight", (src + "attn.qkv.weight",)))
    q = config["qformer_config"]
    for i in range(q["num_hidden_layers"]):
        src, dst = f"Qformer.bert.encoder.layer.{i}.", f"qformer.encoder.layer.{i}."
        parts = [("attention.self.query", "attention.attention.query"), ("attention.self.key", "attention.attention.key"),
                 ("attention.self.value", "attention.attention.value"), ("attention.output.dense", "attention.output.dense"),
                 ("attention.output.LayerNorm", "attention.output.LayerNorm"),
                 ("intermediate_query.dense", "intermediate_query.dense"), ("output_query.dense", "output_query.dense"),
                 ("output_query.LayerNorm", "output_query.LayerNorm")]
        if i % q["cross_attention_frequency"] == 0:
            parts += [(f"crossattention.self.{n}", f"crossattention.attention.{n}") for n in ("query", "key", "value")]
            parts += [("crossattention.output.dense", "crossattention.output.dense"),
                      ("crossattention.output.LayerNorm", "crossattention.output.LayerNorm")]
        table += [(f"{dst}{b}.{p}", (f"{src}{a}.{p}",)) for a, b in parts for p in ("weight", "bias")]
    return table


def _llm_state(folder: str) -> dict:
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        files = sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin")))
    if not files:
        raise ConversionError(f"LLM folder {folder!r} holds no *.safetensors or pytorch_model*.bin weights")
    state = {}
    for path in files:
        state.update(_load(path, "LLM weights"))
    return state


def convert(vit: str, qformer: str, proj: str, llm: str, out: str, template: str = "vicuna_v0",
            vit_depth: int | None = None, vit_heads: int | None = None, qformer_heads: int | None = None,
            log=print) -> str:
    """Write a BLIP-2-layout checkpoint folder `out` (config.json, model.safetensors, tokenizer, prompt sidecar)."""
    from safetensors.torch import save_file
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    config_path = os.path.join(llm, "config.json")
    if not os.path.isfile(config_path):
        raise ConversionError(f"LLM folder {llm!r} has no config.json (pass a Hugging Face format Vicuna / LLaMA folder)")
    with open(config_path, encoding="utf-8") as f:
        llm_config = json.load(f)
    if llm_config.get("model_type") != "llama":
        raise ConversionError(f"{config_path}: model_type {llm_config.get('model_type')!r}; MiniGPT-4 needs a LLaMA / "
                              f"Vicuna model")
    state, origin = merged_state(vit, qformer, proj)
    proj_weight, query_tokens = state.get("llama_proj.weight"), state.get("query_tokens")
    if proj_weight is not None and query_tokens is not None and proj_weight.shape[-1] != query_tokens.shape[-1]:
        raise ConversionError(
            f"tensor 'llama_proj.weight' has shape {tuple(proj_weight.shape)}: its input width is not the Q-Former's "
            f"{query_tokens.shape[-1]} (MiniGPT-4 without a Q-Former, e.g. the Llama-2 checkpoint that projects 4 "
            f"concatenated ViT tokens, is not a BLIP-2 layout and is not supported)")
    config_dict = infer_config(state, llm_config, vit_depth, vit_heads, qformer_heads)
    config = Blip2Config(**config_dict)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Blip2ForConditionalGeneration(config).state_dict().items()}
    files = {"visual_encoder": "EVA ViT checkpoint (or visual_encoder.* of the Q-Former checkpoint)",
             "ln_vision": "Q-Former checkpoint", "query_tokens": "Q-Former checkpoint",
             "Qformer": "Q-Former checkpoint", "llama_proj": "MiniGPT-4 checkpoint"}
    tensors = {}
    for target, sources in key_table(config_dict):
        for source in sources:
            _need(state, source, files[source.split(".")[0]])
        if len(sources) == 2:  # EVA attention: q and v biases, no k bias
            q_bias, v_bias = (state[s] for s in sources)
            for name, tensor in zip(sources, (q_bias, v_bias)):
                if tuple(tensor.shape) != (expected[target][0] // 3,):
                    raise ConversionError(f"tensor {name!r} ({origin[name]}) has shape {tuple(tensor.shape)}, "
                                          f"expected {(expected[target][0] // 3,)}")
            value = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
        else:
            value = state[sources[0]]
            if tuple(value.shape) != expected[target]:
                raise ConversionError(f"tensor {sources[0]!r} ({origin[sources[0]]}) has shape {tuple(value.shape)}, "
                                      f"expected {expected[target]} for {target}")
        tensors[target] = value.float().contiguous()
    for name, value in _llm_state(llm).items():
        target = "language_model." + name
        if target not in expected:
            continue  # e.g. rotary inv_freq buffers of old checkpoints
        if tuple(value.shape) != expected[target]:
            raise ConversionError(f"LLM tensor {name!r} has shape {tuple(value.shape)}, expected {expected[target]}")
        tensors[target] = value.contiguous()
    missing = sorted(k for k in expected if k not in tensors
                     and not (k == "language_model.lm_head.weight" and config.text_config.tie_word_embeddings))
    if missing:
        raise ConversionError(f"missing tensor {missing[0]!r} ({len(missing)} missing in all) for the converted model")
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(llm, name)):
            shutil.copyfile(os.path.join(llm, name), os.path.join(out, name))
    with open(os.path.join(out, "minigpt4_prompt.json"), "w", encoding="utf-8") as f:
        json.dump({"template": template}, f)
    log(f"converted MiniGPT-4 files -> {out}: ViT {config_dict['vision_config']['num_hidden_layers']} blocks, "
        f"Q-Former {config_dict['qformer_config']['num_hidden_layers']} layers, "
        f"{config_dict['num_query_tokens']} queries, prompt template {template}")
    return out
