"""The non-graph parts of an exported folder: tokenizer, chat template, preprocessing and generation defaults."""
from __future__ import annotations

import json
import os
import shutil

from vlm_core.export.errors import ExportError

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILE = "tokenizer.json"


class AssetError(ExportError):
    """A checkpoint file the export needs is missing or unreadable."""


def read_json(path: str) -> dict:
    """A checkpoint's JSON file as a dict ({} when the file is absent)."""
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def find_chat_template(folder: str) -> str | None:
    """The checkpoint's chat template, from chat_template.jinja, chat_template.json or tokenizer_config.json."""
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        return open(jinja, encoding="utf-8").read()
    for name in ("chat_template.json", "tokenizer_config.json", "processor_config.json"):
        template = read_json(os.path.join(folder, name)).get("chat_template")
        if isinstance(template, str):
            return template
        if isinstance(template, list):  # named templates: take the default one
            for entry in template:
                if entry.get("name") == "default":
                    return entry["template"]
    return None


def copy_tokenizer(folder: str, staging: str) -> None:
    source = os.path.join(folder, TOKENIZER_FILE)
    if os.path.isfile(source):
        shutil.copyfile(source, os.path.join(staging, TOKENIZER_FILE))
        return
    try:  # slow-tokenizer checkpoints: let transformers build the fast one
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(folder).backend_tokenizer.save(os.path.join(staging, TOKENIZER_FILE))
    except Exception as e:
        raise AssetError(f"{folder!r} has no tokenizer.json and transformers could not build one ({e})") from None


def generation_defaults(folder: str, config: dict) -> dict:
    """generation_config.json's sampling defaults and EOS ids (falling back to config.json's)."""
    generation = read_json(os.path.join(folder, "generation_config.json"))
    eos = generation.get("eos_token_id", config.get("text_config", {}).get("eos_token_id", config.get("eos_token_id")))
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    keep = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens")
    defaults = {k: generation[k] for k in keep if generation.get(k) is not None}
    defaults["eos_token_ids"] = eos
    return defaults


def video_preprocessor_config(folder: str) -> dict:
    """The checkpoint's video preprocessing as transformers finds it: processor_config.json's "video_processor",
    else video_preprocessor_config.json; {} when neither (the family then falls back to the image config)."""
    nested = read_json(os.path.join(folder, "processor_config.json")).get("video_processor")
    return nested if isinstance(nested, dict) else read_json(os.path.join(folder, "video_preprocessor_config.json"))


def copy_assets(folder: str, staging: str) -> dict:
    """Copy tokenizer and chat template into `staging`; return the manifest entries they make."""
    copy_tokenizer(folder, staging)
    template = find_chat_template(folder)
    if template is not None:
        with open(os.path.join(staging, TEMPLATE_FILE), "w", encoding="utf-8") as f:
            f.write(template)
    preprocessing = read_json(os.path.join(folder, "preprocessor_config.json"))
    config = read_json(os.path.join(folder, "config.json"))
    from vlm_core.runtime.chat.template import special_tokens_from_config

    template_tokens = special_tokens_from_config(read_json(os.path.join(folder, "tokenizer_config.json")))
    return {"tokenizer": TOKENIZER_FILE, "chat_template": TEMPLATE_FILE if template is not None else None,
            "template_variables": template_tokens, "preprocessing": preprocessing,
            "video_preprocessing": video_preprocessor_config(folder),
            "generation": generation_defaults(folder, config)}


def graph_io(path: str) -> dict:
    """Input and output names, element types and dimensions of an ONNX graph, for the manifest."""
    import onnx

    model = onnx.load(path, load_external_data=False)

    def describe(values):
        out = []
        for value in values:
            tensor = value.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
            out.append({"name": value.name, "type": onnx.TensorProto.DataType.Name(tensor.elem_type).lower(),
                        "shape": dims})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output),
            "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))}
