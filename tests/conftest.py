"""Shared fixtures: one tiny random-weight Qwen3-VL checkpoint, exported once per test session (float32,
the quantized configurations, and a float16 KV cache), transformers' eager model + processor on the same
checkpoint as the reference, and the tiny MiniGPT-4 (BLIP-2 + LLaMA) checkpoint and its exports."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _tiny_config():
    from vlm_core.export.demo import tiny_config

    config = tiny_config()
    # Larger initial weights than transformers' 0.02 make the logits spread out, so greedy parity
    # is decided by real margins rather than near-ties at float rounding level.
    config["text_config"]["initializer_range"] = 0.1
    config["vision_config"]["initializer_range"] = 0.1
    return config


@pytest.fixture(scope="session")
def qwen_checkpoint(tmp_path_factory) -> str:
    from vlm_core.export.demo import write_checkpoint

    # Norm weights and biases drawn too (transformers' 1s and 0s would hide a graph that drops one).
    return write_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "qwen3-vl-tiny"), _tiny_config(), seed=0,
                            spread_vectors=True)


@pytest.fixture(scope="session")
def qwen_export(qwen_checkpoint, tmp_path_factory) -> str:
    from vlm_core.export.pipeline import Progress, run_export

    out = str(tmp_path_factory.mktemp("export") / "qwen3-vl-tiny-onnx")
    run_export(qwen_checkpoint, out, progress=Progress(total=6, heartbeat_s=600), parity_tokens=4)
    return out


@pytest.fixture(scope="session")
def qwen_export_kv16(qwen_checkpoint, tmp_path_factory) -> str:
    """The float32 weights with a float16 KV cache (`--quantize none --kv-dtype float16`)."""
    from vlm_core.export.pipeline import Progress, run_export

    out = str(tmp_path_factory.mktemp("export-kv16") / "qwen3-vl-tiny-kv16")
    run_export(qwen_checkpoint, out, progress=Progress(total=6, heartbeat_s=600), parity_tokens=4, kv_dtype="float16")
    return out


@pytest.fixture(scope="session")
def hf_model(qwen_checkpoint):
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(qwen_checkpoint, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def hf_processor(qwen_checkpoint):
    """transformers' Qwen3VLProcessor on the checkpoint, with the PIL image processor (no torchvision here)."""
    import json

    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    class Qwen3VLProcessorNoVideo(transformers.Qwen3VLProcessor):
        # The video processor needs torchvision; only its class check touches it.
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    with open(os.path.join(qwen_checkpoint, "preprocessor_config.json")) as f:
        params = json.load(f)
    keep = ("size", "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
    image_processor = Qwen2VLImageProcessorPil(**{k: params[k] for k in keep})
    tokenizer = transformers.AutoTokenizer.from_pretrained(qwen_checkpoint)
    with open(os.path.join(qwen_checkpoint, "chat_template.jinja")) as f:
        template = f.read()
    return Qwen3VLProcessorNoVideo(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                   chat_template=template)


@pytest.fixture(scope="session")
def vlm(qwen_export):
    from vlm_core.runtime.model import VisionLanguageModel

    return VisionLanguageModel(qwen_export, threads=2)


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> dict:
    """Real photographs (scikit-image's samples) and synthetic images of odd sizes, saved as files."""
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("images")
    images = {
        "astronaut": Image.fromarray(data.astronaut()).resize((97, 131)),
        "coffee": Image.fromarray(data.coffee()).resize((150, 61)),
        "noise": Image.fromarray((np.random.default_rng(3).random((77, 45, 3)) * 255).astype("uint8")),
    }
    paths = {}
    for name, image in images.items():
        paths[name] = str(folder / f"{name}.png")
        image.save(paths[name])
    return paths


def _quantized_export(checkpoint, tmp_path_factory, method: str) -> str:
    from vlm_core.export.pipeline import Progress, run_export

    out = str(tmp_path_factory.mktemp("export-" + method) / f"qwen3-vl-tiny-{method}")
    run_export(checkpoint, out, quantize=method, progress=Progress(total=7, heartbeat_s=600), parity_tokens=4)
    return out


@pytest.fixture(scope="session")
def qwen_export_int8(qwen_checkpoint, tmp_path_factory) -> str:
    return _quantized_export(qwen_checkpoint, tmp_path_factory, "int8")


@pytest.fixture(scope="session")
def qwen_export_int4(qwen_checkpoint, tmp_path_factory) -> str:
    return _quantized_export(qwen_checkpoint, tmp_path_factory, "int4")


@pytest.fixture(scope="session")
def qwen_export_mixed(qwen_checkpoint, tmp_path_factory) -> str:
    return _quantized_export(qwen_checkpoint, tmp_path_factory, "mixed")


# --- MiniGPT-4 (BLIP-2 layout, LLaMA text model) ------------------------------------------------------

@pytest.fixture(scope="session")
def smol_folder(tmp_path_factory) -> str:
    import minigpt4_helpers as helpers

    folder = str(tmp_path_factory.mktemp("smol-tokenizer"))
    helpers.smol_tokenizer_json(folder)
    return folder


@pytest.fixture(scope="session")
def mg_checkpoint(smol_folder, tmp_path_factory) -> str:
    import minigpt4_helpers as helpers

    return helpers.write_blip2_checkpoint(str(tmp_path_factory.mktemp("mg-ckpt") / "blip2-llama-tiny"), smol_folder)


def _mg_export(checkpoint, tmp_path_factory, **kwargs) -> str:
    from vlm_core.export.pipeline import Progress, run_export

    out = str(tmp_path_factory.mktemp("mg-export") / "minigpt4-tiny-onnx")
    run_export(checkpoint, out, progress=Progress(total=6, heartbeat_s=600), parity_tokens=4, **kwargs)
    return out


@pytest.fixture(scope="session")
def mg_export(mg_checkpoint, tmp_path_factory) -> str:
    return _mg_export(mg_checkpoint, tmp_path_factory)


@pytest.fixture(scope="session")
def mg_export_kv16(mg_checkpoint, tmp_path_factory) -> str:
    return _mg_export(mg_checkpoint, tmp_path_factory, kv_dtype="float16")


@pytest.fixture(scope="session")
def mg_vlm(mg_export):
    from vlm_core.runtime.model import VisionLanguageModel

    return VisionLanguageModel(mg_export, threads=2)


@pytest.fixture(scope="session")
def smolvlm_checkpoint(tmp_path_factory) -> str:
    """A tiny random-weight SmolVLM checkpoint folder (safetensors, SmolLM2's tokenizer + SmolVLM's image
    tokens, the processor's configs): 64-pixel tiles, images resized to 128 on the longest edge."""
    import smolvlm_helpers

    return smolvlm_helpers.write_smolvlm_checkpoint(str(tmp_path_factory.mktemp("smolvlm-ckpt") / "smolvlm-tiny"))


@pytest.fixture(scope="session")
def smolvlm_export(smolvlm_checkpoint, tmp_path_factory) -> str:
    from vlm_core.export.pipeline import run_export

    out = str(tmp_path_factory.mktemp("smolvlm-export") / "smolvlm-tiny-onnx")
    run_export(smolvlm_checkpoint, out, parity_tokens=4)
    return out


@pytest.fixture(scope="session")
def smolvlm_hf(smolvlm_checkpoint):
    """transformers' eager model and processor (PIL backend) on the tiny SmolVLM checkpoint."""
    import smolvlm_helpers
    from transformers import SmolVLMForConditionalGeneration

    model = SmolVLMForConditionalGeneration.from_pretrained(smolvlm_checkpoint, attn_implementation="eager").eval()
    return model, smolvlm_helpers.hf_processor(smolvlm_checkpoint)
