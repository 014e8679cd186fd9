"""MiniGPT-4's original files (EVA ViT-g, BLIP-2 Q-Former, llama_proj, Vicuna folder), written tiny with the
original LAVIS / MiniGPT-4 key names and shapes: converted, exported, and checked against (a) an independent
PyTorch re-statement of MiniGPT-4's encode_img on the ORIGINAL tensors and (b) eager transformers on the
converted weights (the export's own parity check); missing or misshaped tensors are refused by name."""
from __future__ import annotations

import json
import math
import os
import shutil

import minigpt4_helpers as helpers
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlm_core.export.minigpt4_convert import ConversionError, convert
from vlm_core.export.parity import relative_error

VIT, VIT_BLOCKS, PATCH, IMAGE = 176, 3, 14, 28  # 176 = 2 EVA heads of 88; 3 blocks in the file, 2 used (LAVIS)
QF, QF_LAYERS, QUERIES, LLM = 128, 2, 32, 64  # 128 = 2 BERT heads of 64


def _original_files(folder: str, smol_folder: str) -> dict:
    g = torch.Generator().manual_seed(11)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.1  # noqa: E731
    ln = lambda n: (1 + r(n), r(n))  # noqa: E731
    eva = {"cls_token": r(1, 1, VIT), "pos_embed": r(1, (IMAGE // PATCH) ** 2 + 1, VIT),
           "patch_embed.proj.weight": r(VIT, 3, PATCH, PATCH), "patch_embed.proj.bias": r(VIT)}
    for i in range(VIT_BLOCKS):
        b = f"blocks.{i}."
        eva[b + "norm1.weight"], eva[b + "norm1.bias"] = ln(VIT)
        eva[b + "norm2.weight"], eva[b + "norm2.bias"] = ln(VIT)
        eva.update({b + "attn.qkv.weight": r(3 * VIT, VIT), b + "attn.q_bias": r(VIT), b + "attn.v_bias": r(VIT),
                    b + "attn.proj.weight": r(VIT, VIT), b + "attn.proj.bias": r(VIT),
                    b + "mlp.fc1.weight": r(2 * VIT, VIT), b + "mlp.fc1.bias": r(2 * VIT),
                    b + "mlp.fc2.weight": r(VIT, 2 * VIT), b + "mlp.fc2.bias": r(VIT)})
    qformer = {"query_tokens": r(1, QUERIES, QF), "ln_vision.weight": 1 + r(VIT), "ln_vision.bias": r(VIT),
               "Qformer.bert.embeddings.LayerNorm.weight": 1 + r(QF), "Qformer.bert.embeddings.LayerNorm.bias": r(QF),
               # text-side tensors MiniGPT-4 deletes (must be ignored), and BLIP-2 heads it never loads
               "Qformer.bert.embeddings.word_embeddings.weight": r(50, QF), "vision_proj.weight": r(16, QF),
               "temp": torch.tensor(0.07)}
    for i in range(QF_LAYERS):
        b = f"Qformer.bert.encoder.layer.{i}."
        blocks = ["attention"] + (["crossattention"] if i % 2 == 0 else [])
        for block in blocks:
            width = VIT if block == "crossattention" else QF
            qformer.update({f"{b}{block}.self.query.weight": r(QF, QF), f"{b}{block}.self.query.bias": r(QF),
                            f"{b}{block}.self.key.weight": r(QF, width), f"{b}{block}.self.key.bias": r(QF),
                            f"{b}{block}.self.value.weight": r(QF, width), f"{b}{block}.self.value.bias": r(QF),
                            f"{b}{block}.output.dense.weight": r(QF, QF), f"{b}{block}.output.dense.bias": r(QF)})
            qformer[f"{b}{block}.output.LayerNorm.weight"], qformer[f"{b}{block}.output.LayerNorm.bias"] = ln(QF)
        for kind in ("", "_query"):  # intermediate/output: the text branch, deleted by MiniGPT-4
            qformer.update({f"{b}intermediate{kind}.dense.weight": r(2 * QF, QF),
                            f"{b}intermediate{kind}.dense.bias": r(2 * QF),
                            f"{b}output{kind}.dense.weight": r(QF, 2 * QF), f"{b}output{kind}.dense.bias": r(QF)})
            qformer[f"{b}output{kind}.LayerNorm.weight"], qformer[f"{b}output{kind}.LayerNorm.bias"] = ln(QF)
    proj = {"llama_proj.weight": r(LLM, QF), "llama_proj.bias": r(LLM)}
    paths = {"vit": os.path.join(folder, "eva_vit_g.pth"), "qformer": os.path.join(folder, "blip2_pretrained.pth"),
             "proj": os.path.join(folder, "pretrained_minigpt4.pth"), "llm": os.path.join(folder, "vicuna")}
    torch.save(eva, paths["vit"])
    torch.save({"model": qformer}, paths["qformer"])
    torch.save({"model": proj, "optimizer": None, "epoch": 3}, paths["proj"])
    from transformers import LlamaConfig, LlamaForCausalLM

    text = helpers.tiny_config()["text_config"]
    llm = helpers.randomize(LlamaForCausalLM(LlamaConfig(**{k: v for k, v in text.items() if k != "model_type"})), 3)
    llm.save_pretrained(paths["llm"])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(smol_folder, name), os.path.join(paths["llm"], name))
    return {"paths": paths, "eva": eva, "qformer": qformer, "proj": proj}


def minigpt4_encode_img(files: dict, image: torch.Tensor, depth: int = VIT_BLOCKS - 1) -> torch.Tensor:
    """MiniGPT-4's encode_img (EVA ViT -> ln_vision -> Q-Former bert -> llama_proj) on the original tensors."""
    e, q, p = files["eva"], files["qformer"], files["proj"]
    x = F.conv2d(image, e["patch_embed.proj.weight"], e["patch_embed.proj.bias"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([e["cls_token"].expand(len(x), -1, -1), x], 1) + e["pos_embed"]

    def heads(t, n):
        return t.reshape(t.shape[0], t.shape[1], n, -1).transpose(1, 2)

    def attention(qs, ks, vs, n):
        qs, ks, vs = heads(qs, n), heads(ks, n), heads(vs, n)
        probs = torch.softmax(qs @ ks.transpose(-1, -2) / math.sqrt(qs.shape[-1]), -1)
        return (probs @ vs).transpose(1, 2).reshape(qs.shape[0], qs.shape[2], -1)

    for i in range(depth):  # EVA Block: qkv with q_bias / zero k bias / v_bias
        b = f"blocks.{i}."
        h = F.layer_norm(x, (VIT,), e[b + "norm1.weight"], e[b + "norm1.bias"], 1e-6)
        bias = torch.cat([e[b + "attn.q_bias"], torch.zeros(VIT), e[b + "attn.v_bias"]])
        qs, ks, vs = F.linear(h, e[b + "attn.qkv.weight"], bias).chunk(3, -1)
        x = x + F.linear(attention(qs, ks, vs, VIT // 88), e[b + "attn.proj.weight"], e[b + "attn.proj.bias"])
        h = F.layer_norm(x, (VIT,), e[b + "norm2.weight"], e[b + "norm2.bias"], 1e-6)
        x = x + F.linear(F.gelu(F.linear(h, e[b + "mlp.fc1.weight"], e[b + "mlp.fc1.bias"])),
                         e[b + "mlp.fc2.weight"], e[b + "mlp.fc2.bias"])
    # ln_vision (transformers' Blip2 uses the vision layer_norm_eps, 1e-6, where LAVIS' LayerNorm has 1e-5)
    image_embeds = F.layer_norm(x, (VIT,), q["ln_vision.weight"], q["ln_vision.bias"], 1e-6)
    lin = lambda t, name: F.linear(t, q[name + ".weight"], q[name + ".bias"])  # noqa: E731
    norm = lambda t, name: F.layer_norm(t, (QF,), q[name + ".weight"], q[name + ".bias"], 1e-12)  # noqa: E731
    h = norm(q["query_tokens"].expand(len(x), -1, -1), "Qformer.bert.embeddings.LayerNorm")
    for i in range(QF_LAYERS):
        b = f"Qformer.bert.encoder.layer.{i}."
        for block in ["attention"] + (["crossattention"] if i % 2 == 0 else []):
            context = image_embeds if block == "crossattention" else h
            out = attention(lin(h, f"{b}{block}.self.query"), lin(context, f"{b}{block}.self.key"),
                            lin(context, f"{b}{block}.self.value"), QF // 64)
            h = norm(lin(out, f"{b}{block}.output.dense") + h, f"{b}{block}.output.LayerNorm")
        h = norm(lin(F.gelu(lin(h, f"{b}intermediate_query.dense")), f"{b}output_query.dense") + h,
                 f"{b}output_query.LayerNorm")
    return F.linear(h, p["llama_proj.weight"], p["llama_proj.bias"])


@pytest.fixture(scope="module")
def smol_folder(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("smol-tokenizer-convert"))
    helpers.smol_tokenizer_json(folder)
    return folder


@pytest.fixture(scope="module")
def original(tmp_path_factory, smol_folder):
    return _original_files(str(tmp_path_factory.mktemp("minigpt4-original")), smol_folder)


def test_convert_export_and_match_original_model(original, tmp_path):
    from vlm_core.export.cli import main
    from vlm_core.runtime.model import VisionLanguageModel

    p = original["paths"]
    out = str(tmp_path / "minigpt4-onnx")
    assert main(["--minigpt4-vit", p["vit"], "--minigpt4-qformer", p["qformer"], "--minigpt4-proj", p["proj"],
                 "--minigpt4-llm", p["llm"], "--minigpt4-template", "llama2", "-o", out,
                 "--parity-tokens", "8"]) == 0
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    # eager on converted weights: main() returned 0, so the export's check passed; it ran on the 8 tokens
    # --parity-tokens asked for
    assert manifest["parity"]["greedy_tokens"] == 8 and manifest["parity"]["first_logits_rel_err"] <= 1e-4
    assert manifest["prompt"]["template"] == "llama2" and manifest["vision_config"]["num_layers"] == VIT_BLOCKS - 1
    vlm = VisionLanguageModel(out, threads=2)
    images = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
    (embeds,) = vlm.sessions["vision"].run(None, {"pixel_values": images.numpy()})
    with torch.no_grad():
        expected = minigpt4_encode_img(original, images).numpy()
    assert relative_error(embeds, expected) < 1e-4
    prompt = vlm.prepare([{"role": "user", "content": [{"type": "image", "image": img} for img in helpers.rng_images()]
                           + [{"type": "text", "text": "Compare."}]}])
    assert prompt.image_tokens == 64 and prompt.input_ids[0] == 1


def _convert_modified(original, tmp_path, which: str, key: str, value=None):
    p = dict(original["paths"])
    state = dict(original[which])
    if value is None:
        del state[key]
    else:
        state[key] = value
    slot = "vit" if which == "eva" else which
    p[slot] = str(tmp_path / f"{which}.pth")
    torch.save(state if which == "eva" else {"model": state}, p[slot])
    return convert(p["vit"], p["qformer"], p["proj"], p["llm"], str(tmp_path / "out"), log=lambda *_: None)


@pytest.mark.parametrize("which, key, value, message", [
    ("eva", "blocks.1.attn.v_bias", None, "visual_encoder.blocks.1.attn.v_bias"),
    ("eva", "blocks.0.attn.q_bias", torch.zeros(VIT - 2), "visual_encoder.blocks.0.attn.q_bias"),
    ("eva", "blocks.1.mlp.fc2.weight", torch.zeros(VIT, VIT), "visual_encoder.blocks.1.mlp.fc2.weight"),
    ("qformer", "Qformer.bert.encoder.layer.0.crossattention.self.key.weight", torch.zeros(QF, QF),
     "Qformer.bert.encoder.layer.0.crossattention.self.key.weight"),
    ("qformer", "ln_vision.weight", None, "ln_vision.weight"),
    ("qformer", "Qformer.bert.encoder.layer.1.output_query.LayerNorm.bias", None,
     "Qformer.bert.encoder.layer.1.output_query.LayerNorm.bias"),
    ("proj", "llama_proj.bias", None, "llama_proj.bias"),
    ("proj", "llama_proj.weight", torch.zeros(LLM, 4 * VIT), "llama_proj.weight"),
])
def test_missing_or_misshaped_tensor_is_refused_by_name(original, tmp_path, which, key, value, message):
    with pytest.raises(ConversionError, match=message.replace(".", r"\.")):
        _convert_modified(original, tmp_path, which, key, value)


def test_cli_reports_conversion_error(original, tmp_path, capsys):
    from vlm_core.export.cli import main

    p = original["paths"]
    code = main(["--minigpt4-vit", str(tmp_path / "absent.pth"), "--minigpt4-qformer", p["qformer"],
                 "--minigpt4-proj", p["proj"], "--minigpt4-llm", p["llm"], "-o", str(tmp_path / "o")])
    assert code == 1 and "absent.pth" in capsys.readouterr().err and not os.path.exists(tmp_path / "o")
