"""models/config.py: manifest sections -> dataclasses (unknown keys ignored, defaults, aliases, errors)."""
from dataclasses import dataclass

import pytest

from vlm_core.models.config import TextConfig, VisionConfig

TEXT = {"num_layers": 2, "num_attention_heads": 4, "num_kv_heads": 2, "head_dim": 16, "hidden_size": 64,
        "vocab_size": 100, "max_context": 4096, "rms_norm_eps": 1e-6}
VISION = {"hidden_size": 32, "num_heads": 2, "patch_size": 16, "out_hidden_size": 64}


def test_unknown_keys_ignored_and_defaults():
    text = TextConfig.from_dict({**TEXT, "some_future_key": 1})
    assert text.num_layers == 2 and text.kv_dtype == "float32" and text.num_deepstack == 0
    assert text.rope_parameters == {} and text.model_type == ""


def test_missing_required_key_names_key_and_section():
    with pytest.raises(ValueError, match="'text_config' lacks 'max_context'"):
        TextConfig.from_dict({k: v for k, v in TEXT.items() if k != "max_context"})
    with pytest.raises(ValueError, match="'vision_config' lacks 'num_layers'"):
        VisionConfig.from_dict(VISION)


def test_vision_depth_read_as_num_layers():
    assert VisionConfig.from_dict({**VISION, "depth": 3}).num_layers == 3
    assert VisionConfig.from_dict({**VISION, "depth": 3, "num_layers": 5}).num_layers == 5


def test_family_subclass_adds_fields():
    @dataclass(kw_only=True)
    class MergingVisionConfig(VisionConfig):
        spatial_merge_size: int

    config = MergingVisionConfig.from_dict({**VISION, "depth": 3, "spatial_merge_size": 2})
    assert (config.num_layers, config.spatial_merge_size) == (3, 2)
    with pytest.raises(ValueError, match="'vision_config' lacks 'spatial_merge_size'"):
        MergingVisionConfig.from_dict({**VISION, "depth": 3})


def test_unknown_kv_dtype_refused():
    with pytest.raises(ValueError, match="kv_dtype 'bfloat16'"):
        TextConfig.from_dict({**TEXT, "kv_dtype": "bfloat16"})
