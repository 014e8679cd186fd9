"""NumPy reference layers (kernels/reference.py) on each family's tiny checkpoint, weights read from its
safetensors files: one decoder layer and one vision block against transformers' modules, a prefill plus a
cached decode step against the whole sequence, and a whole text forward against the exported decoder graph
(run by our runtime) and transformers' logits. SmolVLM also: the pixel shuffle, and whole tiles through the
SigLIP tower and connector against transformers and the exported vision graph."""
from __future__ import annotations

import copy
import functools
import glob
import json
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from vlm_core.export.parity import relative_error
from vlm_core.kernels import reference as ref
from vlm_core.models.qwen3_vl import positions

LAYER_RTOL = 1e-5  # one layer, float32 against float32 eager
LOGITS_RTOL = 1e-4  # the whole text model against the ONNX graph
TILE_RTOL = 1e-5  # a whole tile through the tiny SigLIP tower + connector, against eager and the ONNX graph (6e-7 seen)
TEXT_ONLY = [{"role": "user", "content": [{"type": "text", "text": "Write a haiku about the sea."}]}]


def _load_weights(folder: str) -> dict:
    """Every tensor of a checkpoint folder, as a user's folder holds them (*.safetensors)."""
    weights = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        weights.update(load_file(path))
    return weights


def _under(weights: dict, prefix: str) -> dict:
    return {name[len(prefix):]: tensor for name, tensor in weights.items() if name.startswith(prefix)}


def _spread_vectors(flat: dict, seed: int) -> dict:
    """The same weights with every 1-D weight 1 + N(0, 0.1) and every bias N(0, 0.1). The tiny Qwen3-VL
    checkpoint keeps transformers' init (norm weights 1, biases 0), under which a norm weight or bias applied
    on the wrong axis, or not at all, would go unseen."""
    rng = np.random.default_rng(seed)
    spread = dict(flat)
    for name, tensor in flat.items():
        if tensor.ndim == 1:
            noise = (rng.standard_normal(tensor.shape) * 0.1).astype(np.float32)
            spread[name] = noise if name.endswith("bias") else 1 + noise
    return spread


def _both_weightings(module: torch.nn.Module, flat: dict, seed: int):
    """(our nested weights, the transformers module) with the checkpoint's weights, then with spread vectors."""
    state = module.state_dict()
    assert set(state) == set(flat), "the module and the checkpoint prefix hold different tensors"
    for name, tensor in flat.items():
        np.testing.assert_array_equal(state[name].numpy(), tensor)
    yield ref.nest(flat, ""), module
    spread = _spread_vectors(flat, seed)
    twin = copy.deepcopy(module)
    twin.load_state_dict({name: torch.from_numpy(tensor) for name, tensor in spread.items()})
    yield ref.nest(spread, ""), twin


@dataclass
class TextFamily:
    """What a decoder-layer test needs from one family."""

    weights: dict  # the checkpoint's tensors
    text_model: torch.nn.Module  # transformers' LlamaModel / Qwen3VLTextModel (layers, rotary_emb)
    causal_lm: torch.nn.Module  # what gives text-only logits from input_ids
    layer_prefix: str  # "...layers." in checkpoint names
    norm_prefix: str
    embed_name: str
    lm_head_name: str
    text_config: dict  # config.json's text_config
    position_ids: np.ndarray  # [S] (LLaMA) or [3, S] (M-RoPE), for the layer tests

    @property
    def head_dim(self) -> int:
        config = self.text_config
        return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]

    def cos_sin(self, position_ids):
        rope = self.text_config["rope_parameters"]
        if "mrope_section" in rope:  # Qwen3VLTextRotaryEmbedding interleaves whatever mrope_interleaved says
            return ref.mrope_cos_sin(position_ids, self.head_dim, rope["rope_theta"], rope["mrope_section"],
                                     interleaved=True)
        return ref.rope_cos_sin(position_ids, self.head_dim, rope["rope_theta"])

    def torch_cos_sin(self, x, position_ids):  # transformers' table, [S, head_dim] x 2
        ids = torch.from_numpy(position_ids)
        ids = ids[:, None] if ids.ndim == 2 else ids[None]
        cos, sin = self.text_model.rotary_emb(torch.from_numpy(x)[None], ids)
        return cos[0], sin[0]


def _config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def mg_model(mg_checkpoint):
    from transformers import Blip2ForConditionalGeneration

    return Blip2ForConditionalGeneration.from_pretrained(mg_checkpoint, attn_implementation="eager").eval()


def _image_prompt_positions(image_token_id: int = 151655, merge_size: int = 2) -> np.ndarray:
    """M-RoPE positions [3, S] of text, an image run (grid 1x4x6 -> 6 merged tokens), text: t, h, w all differ."""
    ids = np.array([11, 12, 13, 14] + [image_token_id] * 6 + [15, 16, 17])
    position_ids, _ = positions.get_rope_index(ids, np.array([[1, 4, 6]]), image_token_id, merge_size)
    assert len({tuple(axis) for axis in position_ids}) == 3, "the three M-RoPE axes must differ"
    return position_ids


@pytest.fixture(scope="module")
def qwen_text(qwen_checkpoint, hf_model) -> TextFamily:
    config = _config(qwen_checkpoint)
    position_ids = _image_prompt_positions(config["image_token_id"], config["vision_config"]["spatial_merge_size"])
    return TextFamily(_load_weights(qwen_checkpoint), hf_model.model.language_model, hf_model,
                      "model.language_model.layers.",
                      "model.language_model.norm.", "model.language_model.embed_tokens.weight",
                      "model.language_model.embed_tokens.weight",  # tied
                      config["text_config"], position_ids)


@pytest.fixture(scope="module")
def mg_text(mg_checkpoint, mg_model) -> TextFamily:
    config = _config(mg_checkpoint)
    return TextFamily(_load_weights(mg_checkpoint), mg_model.language_model.model, mg_model.language_model,
                      "language_model.model.layers.", "language_model.model.norm.",
                      "language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
                      config["text_config"], np.arange(5, 14))


@pytest.fixture(scope="module")
def smolvlm_weights(smolvlm_checkpoint) -> dict:
    return _load_weights(smolvlm_checkpoint)


@pytest.fixture(scope="module")
def smolvlm_text(smolvlm_checkpoint, smolvlm_weights, smolvlm_hf) -> TextFamily:
    model, _ = smolvlm_hf
    return TextFamily(smolvlm_weights, model.model.text_model, model, "model.text_model.layers.",
                      "model.text_model.norm.", "model.text_model.embed_tokens.weight", "lm_head.weight",
                      _config(smolvlm_checkpoint)["text_config"], np.arange(3, 12))


@pytest.fixture(scope="module")
def smolvlm_vlm(smolvlm_export):
    from vlm_core.runtime.model import VisionLanguageModel

    return VisionLanguageModel(smolvlm_export, threads=2)


FAMILIES = {"qwen3_vl": "qwen_text", "minigpt4": "mg_text", "smolvlm": "smolvlm_text"}
ENGINES = {"qwen3_vl": "vlm", "minigpt4": "mg_vlm", "smolvlm": "smolvlm_vlm"}


# --- one decoder layer -----------------------------------------------------------------------------


def _causal_bias(length: int) -> torch.Tensor:  # transformers' additive causal mask [1, 1, S, S]
    return torch.triu(torch.full((length, length), torch.finfo(torch.float32).min), 1)[None, None]


@pytest.mark.parametrize("family", FAMILIES)
def test_rotary_table_matches_transformers(family, request):
    text = request.getfixturevalue(FAMILIES[family])
    x = np.zeros((text.position_ids.shape[-1], text.text_config["hidden_size"]), np.float32)
    cos, sin = text.cos_sin(text.position_ids)
    torch_cos, torch_sin = text.torch_cos_sin(x, text.position_ids)
    assert relative_error(cos, torch_cos.numpy()) < 1e-6
    assert relative_error(sin, torch_sin.numpy()) < 1e-6


def test_block_mrope_matches_qwen2_vl_and_text_positions_give_rope():
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

    head_dim, theta, section = 16, 1e6, [4, 2, 2]
    config = Qwen2VLTextConfig(hidden_size=64, num_attention_heads=4, head_dim=head_dim,
                               rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": section})
    position_ids = _image_prompt_positions()
    torch_cos, torch_sin = Qwen2VLRotaryEmbedding(config)(torch.zeros(1), torch.from_numpy(position_ids)[:, None])
    cos, sin = ref.mrope_cos_sin(position_ids, head_dim, theta, section, interleaved=False)
    assert relative_error(cos, torch_cos[0].numpy()) < 1e-6 and relative_error(sin, torch_sin[0].numpy()) < 1e-6
    text = np.arange(7, 20)  # the same position on all three axes: plain 1-D rotary, either layout
    for interleaved in (True, False):
        for ours, plain in zip(ref.mrope_cos_sin(np.stack([text] * 3), head_dim, theta, section, interleaved),
                               ref.rope_cos_sin(text, head_dim, theta)):
            np.testing.assert_array_equal(ours, plain)


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_layer_matches_transformers(family, request):
    text = request.getfixturevalue(FAMILIES[family])
    length = text.position_ids.shape[-1]
    x = np.random.default_rng(0).standard_normal((length, text.text_config["hidden_size"])).astype(np.float32)
    cos, sin = text.cos_sin(text.position_ids)
    torch_cos, torch_sin = text.torch_cos_sin(x, text.position_ids)
    flat = _under(text.weights, text.layer_prefix + "0.")
    for layer, module in _both_weightings(text.text_model.layers[0], flat, seed=1):
        with torch.no_grad():
            expected = module(torch.from_numpy(x)[None], position_embeddings=(torch_cos[None], torch_sin[None]),
                              attention_mask=_causal_bias(length))[0].numpy()
        ours = ref.decoder_layer(x, cos, sin, **layer, head_dim=text.head_dim, eps=text.text_config["rms_norm_eps"])
        assert relative_error(ours, expected) < LAYER_RTOL


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_then_cached_step_equals_whole_sequence(family, request):
    text = request.getfixturevalue(FAMILIES[family])
    length = text.position_ids.shape[-1]
    x = np.random.default_rng(2).standard_normal((length, text.text_config["hidden_size"])).astype(np.float32)
    cos, sin = text.cos_sin(text.position_ids)
    layer = ref.nest(text.weights, text.layer_prefix + "0.")
    settings = dict(head_dim=text.head_dim, eps=text.text_config["rms_norm_eps"])
    whole = ref.decoder_layer(x, cos, sin, **layer, **settings)
    # capacity past the sequence: the unfilled slots (zeros) must be masked out
    cache = ref.LayerCache.empty(text.text_config["num_key_value_heads"], length + 5, text.head_dim)
    prefill = ref.decoder_layer(x[:-1], cos[:-1], sin[:-1], **layer, **settings, cache=cache)
    step = ref.decoder_layer(x[-1:], cos[-1:], sin[-1:], **layer, **settings, cache=cache)
    assert cache.length == length
    assert relative_error(np.concatenate([prefill, step]), whole) < LAYER_RTOL


# --- one vision block ------------------------------------------------------------------------------


def test_qwen3_vl_vision_block_matches_transformers(qwen_checkpoint, hf_model):
    vision = _config(qwen_checkpoint)["vision_config"]
    grid = np.array([[1, 4, 6], [1, 6, 2]])  # two images of different shapes: attention in two blocks
    patch_positions = positions.vision_position_ids(grid, vision["spatial_merge_size"])
    segment_ids = positions.attention_segment_ids(grid)
    frame_sizes = np.bincount(segment_ids)
    cu_seqlens = torch.tensor(np.concatenate([[0], np.cumsum(frame_sizes)]), dtype=torch.int32)
    x = np.random.default_rng(3).standard_normal((len(segment_ids), vision["hidden_size"])).astype(np.float32)
    head_dim = vision["hidden_size"] // vision["num_heads"]
    cos, sin = ref.vision_rotary_cos_sin(patch_positions, head_dim, vision["rope_parameters"]["rope_theta"])
    torch_cos, torch_sin = hf_model.model.visual.rotary_pos_emb(torch.from_numpy(x), torch.from_numpy(patch_positions))
    assert relative_error(cos, torch_cos.numpy()) < 1e-6 and relative_error(sin, torch_sin.numpy()) < 1e-6
    assert vision["hidden_act"] == "gelu_pytorch_tanh"

    flat = _under(_load_weights(qwen_checkpoint), "model.visual.blocks.0.")
    for block, module in _both_weightings(hf_model.model.visual.blocks[0], flat, seed=4):
        with torch.no_grad():
            expected = module(torch.from_numpy(x), cu_seqlens=cu_seqlens,
                              position_embeddings=(torch_cos, torch_sin)).numpy()
        arguments = (block["norm1"], block["attn"]["qkv"], block["attn"]["proj"], block["norm2"],
                     block["mlp"]["linear_fc1"], block["mlp"]["linear_fc2"], vision["num_heads"], 1e-6)
        ours = ref.vit_block(x, *arguments, mask=ref.segment_mask(segment_ids), cos=cos, sin=sin, approximate="tanh")
        assert relative_error(ours, expected) < LAYER_RTOL
        unmasked = ref.vit_block(x, *arguments, cos=cos, sin=sin, approximate="tanh")
        assert relative_error(unmasked, expected) > 1e-3, "the per-image blocks must matter to this check"


def test_minigpt4_vit_block_matches_transformers(mg_checkpoint, mg_model):
    vision = _config(mg_checkpoint)["vision_config"]
    tokens = 1 + (vision["image_size"] // vision["patch_size"]) ** 2  # class token + patches
    x = np.random.default_rng(5).standard_normal((2, tokens, vision["hidden_size"])).astype(np.float32)
    assert vision["hidden_act"] == "gelu"  # erf
    flat = _under(_load_weights(mg_checkpoint), "vision_model.encoder.layers.0.")
    for block, module in _both_weightings(mg_model.vision_model.encoder.layers[0], flat, seed=6):
        with torch.no_grad():
            expected = module(torch.from_numpy(x)).numpy()  # [2 images, tokens, D]
        # the two images as one sequence of two attention blocks
        ours = ref.vit_block(x.reshape(2 * tokens, -1), block["layer_norm1"], block["self_attn"]["qkv"],
                             block["self_attn"]["projection"], block["layer_norm2"], block["mlp"]["fc1"],
                             block["mlp"]["fc2"], vision["num_attention_heads"], vision["layer_norm_eps"],
                             mask=ref.segment_mask(np.repeat([0, 1], tokens)), approximate="none")
        assert relative_error(ours, expected.reshape(2 * tokens, -1)) < LAYER_RTOL


def test_smolvlm_siglip_encoder_layer_matches_transformers(smolvlm_checkpoint, smolvlm_weights, smolvlm_hf):
    vision = _config(smolvlm_checkpoint)["vision_config"]
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2  # one whole tile's patches
    x = np.random.default_rng(7).standard_normal((2, tokens, vision["hidden_size"])).astype(np.float32)
    assert vision["hidden_act"] == "gelu_pytorch_tanh"
    flat = _under(smolvlm_weights, "model.vision_model.encoder.layers.0.")
    for block, module in _both_weightings(smolvlm_hf[0].model.vision_model.encoder.layers[0], flat, seed=8):
        with torch.no_grad():
            expected = module(torch.from_numpy(x), attention_mask=None).numpy()  # [2 tiles, tokens, D]
        # the two tiles as one sequence of two attention blocks
        ours = ref.siglip_encoder_layer(x.reshape(2 * tokens, -1), **block, num_heads=vision["num_attention_heads"],
                                        eps=vision["layer_norm_eps"], mask=ref.segment_mask(np.repeat([0, 1], tokens)))
        assert relative_error(ours, expected.reshape(2 * tokens, -1)) < LAYER_RTOL


@pytest.mark.parametrize("scale_factor", [2, 4])
def test_pixel_shuffle_matches_smolvlm_connector(scale_factor, smolvlm_hf):
    x = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)  # an 8 x 8 grid of distinct 3-vectors
    with torch.no_grad():
        expected = smolvlm_hf[0].model.connector.pixel_shuffle(torch.from_numpy(x)[None], scale_factor)[0].numpy()
    np.testing.assert_array_equal(ref.pixel_shuffle(x, scale_factor), expected)


@pytest.fixture(scope="module")
def smolvlm_tile(smolvlm_checkpoint, smolvlm_weights):
    """ref.smolvlm_image_embeds with the checkpoint's weights bound: [3, T, T] -> [tokens_per_tile, text_hidden]."""
    config = _config(smolvlm_checkpoint)
    vision = config["vision_config"]
    return functools.partial(ref.smolvlm_image_embeds, vision_model=ref.nest(smolvlm_weights, "model.vision_model."),
                             connector=ref.nest(smolvlm_weights, "model.connector."),
                             num_heads=vision["num_attention_heads"], eps=vision["layer_norm_eps"],
                             scale_factor=config["scale_factor"])


def _tiles(count: int, size: int) -> np.ndarray:  # normalized pixel values in [-1, 1], [count, 3, size, size]
    return np.random.default_rng(9).uniform(-1, 1, (count, 3, size, size)).astype(np.float32)


def test_smolvlm_tile_matches_transformers(smolvlm_checkpoint, smolvlm_weights, smolvlm_tile, smolvlm_hf):
    vision = _config(smolvlm_checkpoint)["vision_config"]
    pixel_values = _tiles(1, vision["image_size"])
    side = vision["image_size"] // vision["patch_size"]
    model = smolvlm_hf[0].model
    with torch.no_grad():
        embeddings = model.vision_model.embeddings(torch.from_numpy(pixel_values),
                                                   torch.ones((1, side, side), dtype=torch.bool))[0].numpy()
        image_embeds = model.get_image_features(torch.from_numpy(pixel_values)[None]).pooler_output[0].numpy()
    ours = ref.siglip_embeddings(pixel_values[0], **ref.nest(smolvlm_weights, "model.vision_model.embeddings."))
    assert relative_error(ours, embeddings) < LAYER_RTOL
    ours = smolvlm_tile(pixel_values[0])
    assert ours.shape == image_embeds.shape  # [tokens_per_tile, text_hidden]
    assert relative_error(ours, image_embeds) < TILE_RTOL


def test_smolvlm_tiles_match_exported_vision_graph(smolvlm_checkpoint, smolvlm_export, smolvlm_tile):
    import onnxruntime as ort

    pixel_values = _tiles(2, _config(smolvlm_checkpoint)["vision_config"]["image_size"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(os.path.join(smolvlm_export, "vision.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    (graph_embeds,) = session.run(["image_embeds"], {"pixel_values": pixel_values})  # [tiles, tokens, text_hidden]
    ours = np.stack([smolvlm_tile(tile) for tile in pixel_values])
    assert ours.shape == graph_embeds.shape
    assert relative_error(ours, graph_embeds) < TILE_RTOL


# --- the whole text model against the exported graph -----------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_text_forward_matches_exported_decoder(family, request):
    text = request.getfixturevalue(FAMILIES[family])
    engine = request.getfixturevalue(ENGINES[family])
    prompt = engine.prepare(TEXT_ONLY)
    graph_logits = engine.prefill(prompt)

    config = text.text_config
    layers = [ref.nest(text.weights, f"{text.layer_prefix}{i}.") for i in range(config["num_hidden_layers"])]
    cos, sin = text.cos_sin(prompt.position_ids)
    inputs_embeds = text.weights[text.embed_name][prompt.input_ids]  # [S, H]
    logits = ref.decoder_logits(inputs_embeds, cos, sin, layers, ref.nest(text.weights, text.norm_prefix),
                                text.weights[text.lm_head_name], head_dim=text.head_dim, eps=config["rms_norm_eps"])
    assert relative_error(logits, graph_logits) < LOGITS_RTOL

    with torch.no_grad():
        expected = text.causal_lm(input_ids=torch.from_numpy(prompt.input_ids)[None]).logits[0, -1].numpy()
    assert relative_error(logits, expected) < LOGITS_RTOL
