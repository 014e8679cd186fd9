"""Prompt building (runtime/chat/template.py + models/qwen3_vl/prompt.py) against transformers.

Oracle: a real ``Qwen3VLProcessor`` (transformers 5.x) assembled offline in a temp dir from
* the real Qwen2/Qwen3 BPE vocabulary (tests/qwen_vocab.py) + Qwen3-VL's added tokens, saved as
  tokenizer.json with a tokenizer_config.json like Qwen3-VL-2B-Instruct's,
* the PIL image processor ``Qwen2VLImageProcessorPil`` with Qwen3-VL's preprocessor config
  (patch 16, temporal 2, merge 2, mean/std 0.5; the default fast image processor and the video
  processor need torchvision, which is not installed),
* the real chat template (models/qwen3_vl/chat_template.jinja).

For each conversation we check that ``render_chat`` equals
``processor.apply_chat_template(..., tokenize=False)`` and that ``render_chat`` ->
``expand_image_pads`` (with the processor's ``image_grid_thw``) -> ``tokenize_prompt`` equals
``processor.apply_chat_template(..., tokenize=True, return_dict=True)["input_ids"]``.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

from vlm_core.models.qwen3_vl.prompt import (  # noqa: E402
    IMAGE_PAD,
    expand_image_pads,
    num_image_tokens,
    tokenize_prompt,
)
from vlm_core.runtime.chat.messages import build_user_messages, normalize_messages  # noqa: E402
from vlm_core.runtime.chat.template import (  # noqa: E402
    compile_chat_template,
    render_chat,
    special_tokens_from_config,
)

TEMPLATE_PATH = ROOT / "vlm_core" / "models" / "qwen3_vl" / "chat_template.jinja"
MERGE_SIZE = 2
# Qwen3 added tokens after Qwen2.5's <tool_call>..<|file_sep|> (151657..151664); not special.
QWEN3_EXTRA_TOKENS = ("<tool_response>", "</tool_response>", "<think>", "</think>")  # 151665..151668
QWEN3VL_SPECIALS = (
    "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip


# --------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template() -> str:
    return TEMPLATE_PATH.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import AddedToken, Tokenizer

    from vlm_core.export.qwen_vocab import build_qwen_tokenizer

    tok = Tokenizer.from_str(build_qwen_tokenizer(with_tool_tokens=True).to_str())  # private copy
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in QWEN3_EXTRA_TOKENS])
    for i, t in enumerate(QWEN3_EXTRA_TOKENS):
        assert tok.token_to_id(t) == 151665 + i
    return tok


@pytest.fixture(scope="module")
def tokenizer_config(tokenizer) -> dict:
    added = {
        str(i): {
            "content": t.content,
            "lstrip": t.lstrip,
            "normalized": t.normalized,
            "rstrip": t.rstrip,
            "single_word": t.single_word,
            "special": t.special,
        }
        for i, t in sorted(tokenizer.get_added_tokens_decoder().items())
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(QWEN3VL_SPECIALS),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262144,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


@pytest.fixture(scope="module")
def processor(tmp_path_factory, tokenizer, tokenizer_config, template):
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    d = tmp_path_factory.mktemp("qwen3vl_processor")
    tokenizer.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(d))

    # Qwen3-VL-2B-Instruct preprocessor_config.json values.
    image_processor = Qwen2VLImageProcessorPil(
        size={"longest_edge": 16777216, "shortest_edge": 65536},
        patch_size=16,
        temporal_patch_size=2,
        merge_size=MERGE_SIZE,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )

    class _Qwen3VLProcessorNoVideo(transformers.Qwen3VLProcessor):
        # The video processor needs torchvision; its class check is the only thing that needs it
        # (the text/image path never touches video_processor).
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return _Qwen3VLProcessorNoVideo(
        image_processor=image_processor, tokenizer=hf_tok, video_processor=None, chat_template=template
    )


def _image(w: int, h: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def images():
    return {"a": _image(64, 48, 0), "b": _image(40, 90, 1), "c": _image(33, 33, 2)}


@pytest.fixture(scope="module")
def image_files(tmp_path_factory, images):
    d = tmp_path_factory.mktemp("imgs")
    paths = {}
    for k, im in images.items():
        paths[k] = str(d / f"{k}.png")
        im.save(paths[k])
    return paths


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _oracle(processor, messages, **kwargs):
    text = processor.apply_chat_template(copy.deepcopy(messages), tokenize=False, add_generation_prompt=True, **kwargs)
    out = processor.apply_chat_template(
        copy.deepcopy(messages), tokenize=True, add_generation_prompt=True, return_dict=True, **kwargs
    )
    ids = np.asarray(out["input_ids"], dtype=np.int64)
    assert ids.ndim == 2 and ids.shape[0] == 1
    grid = np.asarray(out["image_grid_thw"]) if "image_grid_thw" in out else np.zeros((0, 3), np.int64)
    return text, ids[0], grid


def _ours(template, tokenizer, tokenizer_config, messages, grid, **kwargs):
    specials = special_tokens_from_config(tokenizer_config)
    text = render_chat(template, messages, add_generation_prompt=True, **specials, **kwargs)
    ids = tokenize_prompt(tokenizer, expand_image_pads(text, grid, MERGE_SIZE))
    return text, ids


def _check(processor, template, tokenizer, tokenizer_config, messages, n_images, **kwargs):
    ref_text, ref_ids, grid = _oracle(processor, messages, **kwargs)
    assert grid.shape == (n_images, 3)
    text, ids = _ours(template, tokenizer, tokenizer_config, messages, grid, **kwargs)
    assert text == ref_text
    assert text.count(IMAGE_PAD) == n_images
    assert ids.dtype == np.int64 and ids.ndim == 1
    np.testing.assert_array_equal(ids, ref_ids)
    # the pads in the ids are exactly the expanded counts
    pad_id = tokenizer.token_to_id(IMAGE_PAD)
    assert int((ids == pad_id).sum()) == sum(num_image_tokens(grid, MERGE_SIZE))
    # normalize_messages output renders the same
    norm, sources = normalize_messages(messages)
    assert len(sources) == n_images
    assert render_chat(template, norm, **special_tokens_from_config(tokenizer_config), **kwargs) == ref_text
    return text, ids, grid


# --------------------------------------------------------------------------------------
# template file
# --------------------------------------------------------------------------------------


def test_template_file_is_the_qwen3_vl_instruct_template(template):
    assert template.startswith("{%- if tools %}\n    {{- '<|im_start|>system\\n' }}")
    assert template.endswith("{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n")
    assert len(template) == 5292
    compile_chat_template(template)
    assert compile_chat_template(template) is compile_chat_template(template)  # cached




# --------------------------------------------------------------------------------------
# against transformers
# --------------------------------------------------------------------------------------


def test_multi_turn_multi_image(processor, template, tokenizer, tokenizer_config, images):
    messages = [
        {"role": "system", "content": "You are a careful visual assistant."},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": images["a"]},
                {"type": "image", "image": images["b"]},
                {"type": "text", "text": "Compare these two pictures. Which one is taller?"},
            ],
        },
        {"role": "assistant", "content": "The second one (40x90) is taller."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "And this one?\n"},
                {"type": "image", "image": images["c"]},
                {"type": "text", "text": " Answer briefly."},
            ],
        },
    ]
    text, ids, grid = _check(processor, template, tokenizer, tokenizer_config, messages, n_images=3)
    assert text.startswith("<|im_start|>system\nYou are a careful visual assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_start|>assistant\n")
    counts = num_image_tokens(grid, MERGE_SIZE)
    assert len(set(counts[:2])) == 2  # different sizes -> different pad counts
    # the expanded placeholder runs appear in image order, each between vision_start/end
    vs, ve, pad = (tokenizer.token_to_id(t) for t in ("<|vision_start|>", "<|vision_end|>", IMAGE_PAD))
    starts = np.flatnonzero(ids == vs)
    ends = np.flatnonzero(ids == ve)
    assert [int(e - s - 1) for s, e in zip(starts, ends)] == counts
    assert all((ids[s + 1 : e] == pad).all() for s, e in zip(starts, ends))


def test_text_only(processor, template, tokenizer, tokenizer_config):
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be terse."}]},
        {"role": "user", "content": "Hello! Ça va? 你好，世界 🌍 — naïve café (decomposed: cafe\u0301)"},
        {"role": "assistant", "content": [{"type": "text", "text": "Fine, thanks.\n\n  Indented  line"}]},
        {"role": "user", "content": [{"type": "text", "text": "Count: 12345 apples;\ttabs\r\nand CRLF"}]},
    ]
    text, ids, _ = _check(processor, template, tokenizer, tokenizer_config, messages, n_images=0)
    assert IMAGE_PAD not in text
    assert "cafe\u0301" in text  # the template keeps the text; NFC happens in the tokenizer


def test_one_image(processor, template, tokenizer, tokenizer_config, images):
    messages = [
        {"role": "user", "content": [{"type": "image", "image": images["b"]}, {"type": "text", "text": "Describe."}]}
    ]
    text, ids, grid = _check(processor, template, tokenizer, tokenizer_config, messages, n_images=1)
    assert text == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("system", [None, "You are a helpful assistant."])
def test_build_user_messages(processor, template, tokenizer, tokenizer_config, image_files, system):
    messages = build_user_messages("What differs between these?", [image_files["b"], image_files["a"]], system=system)
    assert [m["role"] for m in messages] == (["user"] if system is None else ["system", "user"])
    assert messages[-1]["content"] == [
        {"type": "image", "image": image_files["b"]},
        {"type": "image", "image": image_files["a"]},
        {"type": "text", "text": "What differs between these?"},
    ]
    text, _, grid = _check(processor, template, tokenizer, tokenizer_config, messages, n_images=2)
    assert text.startswith("<|im_start|>system\n" if system else "<|im_start|>user\n<|vision_start|>")
    # images in the order given: b (40x90, portrait) first
    assert grid[0, 1] > grid[0, 2] and grid[1, 1] < grid[1, 2]
    assert normalize_messages(messages)[1] == [image_files["b"], image_files["a"]]


def test_build_user_messages_text_only(processor, template, tokenizer, tokenizer_config):
    messages = build_user_messages("Just text.", [])
    assert messages == [{"role": "user", "content": [{"type": "text", "text": "Just text."}]}]
    _check(processor, template, tokenizer, tokenizer_config, messages, n_images=0)


def test_assistant_think_content(processor, template, tokenizer, tokenizer_config, images):
    # The Instruct template has no reasoning handling: <think> blocks in assistant content are
    # kept verbatim (no stripping of earlier turns' thinking), reasoning_content is ignored.
    messages = [
        {"role": "user", "content": [{"type": "image", "image": images["a"]}, {"type": "text", "text": "Colour?"}]},
        {
            "role": "assistant",
            "content": "<think>\nThe pixels look random.\n</think>\n\nMixed colours.",
            "reasoning_content": "hidden reasoning",
        },
        {"role": "user", "content": "Sure?"},
    ]
    text, ids, _ = _check(processor, template, tokenizer, tokenizer_config, messages, n_images=1)
    assert "<|im_start|>assistant\n<think>\nThe pixels look random.\n</think>\n\nMixed colours.<|im_end|>" in text
    assert "hidden reasoning" not in text
    assert tokenizer.token_to_id("<think>") in ids and tokenizer.token_to_id("</think>") in ids


def test_image_source_keys_and_order(processor, template, tokenizer, tokenizer_config, image_files, images):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "path": image_files["a"]},
                {"type": "image_url", "image_url": {"url": image_files["b"]}},
                {"type": "text", "text": "and"},
                {"type": "image", "url": image_files["c"]},
                {"type": "image", "image": images["a"]},
            ],
        }
    ]
    _, _, grid = _check(processor, template, tokenizer, tokenizer_config, messages, n_images=4)
    norm, sources = normalize_messages(messages)
    assert sources == [image_files["a"], image_files["b"], image_files["c"], images["a"]]
    assert norm[0]["content"][1] == {"type": "image", "url": image_files["b"]}
    # same order as the processor collects them
    convs, _ = processor._normalize_conversations(copy.deepcopy(messages))
    ref_sources = processor._multimodal_inputs_from_conversations(convs, {}, False)[0][0]
    assert sources == ref_sources
    assert grid[0].tolist() == grid[3].tolist()  # same image a, by path and as PIL


def test_add_vision_id_and_special_tokens(processor, template, tokenizer, tokenizer_config, images):
    messages = [
        {"role": "user", "content": [{"type": "image", "image": images["a"]}, {"type": "text", "text": "One"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "image", "image": images["c"]}, {"type": "text", "text": "Two"}]},
    ]
    text, _, _ = _check(processor, template, tokenizer, tokenizer_config, messages, n_images=2, add_vision_id=True)
    assert "Picture 1: <|vision_start|>" in text and "Picture 2: <|vision_start|>" in text
    assert special_tokens_from_config(tokenizer_config) == processor.tokenizer.special_tokens_map


def test_tools_and_tool_calls(processor, template, tokenizer, tokenizer_config, images):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "zoom",
                "description": "Zoom into a region <x1,y1,x2,y2> & return it — 放大",
                "parameters": {
                    "type": "object",
                    "properties": {"box": {"type": "array", "items": {"type": "integer"}}},
                    "required": ["box"],
                },
            },
        }
    ]
    messages = [
        {"role": "system", "content": "Use tools when useful."},
        {"role": "user", "content": [{"type": "image", "image": images["b"]}, {"type": "text", "text": "Zoom top."}]},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "zoom", "arguments": {"box": [0, 0, 40, 45]}}}],
        },
        {"role": "tool", "content": [{"type": "image", "image": images["c"]}, {"type": "text", "text": "zoomed"}]},
        {"role": "tool", "content": "second result"},
    ]
    text, _, _ = _check(processor, template, tokenizer, tokenizer_config, messages, n_images=2, tools=tools)
    assert '"description": "Zoom into a region <x1,y1,x2,y2> & return it — 放大"' in text  # tojson: no escaping
    assert '<tool_call>\n{"name": "zoom", "arguments": {"box": [0, 0, 40, 45]}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n<|vision_start|><|image_pad|><|vision_end|>zoomed\n</tool_response>" in text


def test_none_values_dropped(processor, template, tokenizer, tokenizer_config):
    messages = [
        {"role": "user", "content": "hi", "name": None},
        {"role": "assistant", "content": "yo", "tool_calls": None},
        {"role": "user", "content": "again"},
    ]
    _check(processor, template, tokenizer, tokenizer_config, messages, n_images=0)


def test_no_generation_prompt(processor, template, images):
    messages = [{"role": "user", "content": [{"type": "image", "image": images["a"]}, {"type": "text", "text": "x"}]}]
    ref = processor.apply_chat_template(copy.deepcopy(messages), tokenize=False, add_generation_prompt=False)
    assert render_chat(template, messages, add_generation_prompt=False) == ref
    assert not ref.endswith("<|im_start|>assistant\n")


# --------------------------------------------------------------------------------------
# prompt.py unit behaviour
# --------------------------------------------------------------------------------------


def test_expand_image_pads_basic():
    text = "a<|vision_start|><|image_pad|><|vision_end|>b<|vision_start|><|image_pad|><|vision_end|>c"
    out = expand_image_pads(text, [[1, 4, 6], [1, 2, 2]], 2)
    assert out == "a<|vision_start|>" + IMAGE_PAD * 6 + "<|vision_end|>b<|vision_start|>" + IMAGE_PAD + "<|vision_end|>c"
    assert expand_image_pads("no images", np.zeros((0, 3), np.int64), 2) == "no images"
    assert expand_image_pads("no images", [], 2) == "no images"
    assert expand_image_pads("<|video_pad|>", [], 2) == "<|video_pad|>"  # videos untouched


def test_expand_image_pads_count_mismatch():
    with pytest.raises(ValueError, match=r"2 <\|image_pad\|> placeholder\(s\) but 1 image"):
        expand_image_pads(IMAGE_PAD + IMAGE_PAD, [[1, 2, 2]], 2)
    with pytest.raises(ValueError, match=r"1 <\|image_pad\|> placeholder\(s\) but 0 image"):
        expand_image_pads("x" + IMAGE_PAD, [], 2)
    with pytest.raises(ValueError, match=r"0 <\|image_pad\|> placeholder\(s\) but 1 image"):
        expand_image_pads("x", [[1, 2, 2]], 2)
    with pytest.raises(ValueError, match="shape"):
        expand_image_pads(IMAGE_PAD, [1, 2, 2], 2)


def test_tokenize_prompt_no_bos(tokenizer):
    ids = tokenize_prompt(tokenizer, "<|im_start|>user\n你好<|im_end|>")
    assert ids.dtype == np.int64
    assert ids.tolist() == [151644, 872, 198, 108386, 151645]


# --------------------------------------------------------------------------------------
# chat.py validation
# --------------------------------------------------------------------------------------


def test_normalize_messages_videos():
    """Video parts, in every spelling, become VideoPart sources in conversation order among the images;
    the template sees {"type": "video", ...} (what transformers' processor hands it)."""
    from vlm_core.models.media import VideoPart

    messages = [{"role": "user", "content": [
        {"type": "video", "video": "a.mp4"}, {"type": "image", "image": "b.png"},
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}, {"video": ["f1.png", "f2.png"]},
        {"type": "video", "path": "c.webm"}, {"type": "text", "text": "What happens?"}]}]
    out, media = normalize_messages(messages)
    assert media == [VideoPart("a.mp4"), "b.png", VideoPart("data:video/mp4;base64,AAAA"),
                     VideoPart(["f1.png", "f2.png"]), VideoPart("c.webm")]
    assert [p["type"] for p in out[0]["content"]] == ["video", "image", "video", "video", "video", "text"]
    assert out[0]["content"][2] == {"type": "video", "url": "data:video/mp4;base64,AAAA"}


def test_normalize_messages_errors():
    with pytest.raises(ValueError, match=r"messages\[1\].*no 'role'"):
        normalize_messages([{"role": "user", "content": "a"}, {"content": "b"}])
    with pytest.raises(ValueError, match=r"messages\[0\]\.content\[1\].*unknown content part type 'audio'"):
        normalize_messages([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "audio", "audio": "x"}]}])
    with pytest.raises(ValueError, match=r"messages\[0\]\.content\[0\].*video part needs exactly one source"):
        normalize_messages([{"role": "user", "content": [{"type": "video"}]}])
    with pytest.raises(ValueError, match=r"video_url part has no 'url'"):
        normalize_messages([{"role": "user", "content": [{"type": "video_url", "video_url": {}}]}])
    with pytest.raises(ValueError, match=r"image part has no image source"):
        normalize_messages([{"role": "user", "content": [{"type": "image"}]}])
    with pytest.raises(ValueError, match=r"several image sources"):
        normalize_messages([{"role": "user", "content": [{"type": "image", "image": "a.png", "url": "b.png"}]}])
    with pytest.raises(ValueError, match=r"text part needs a string 'text'"):
        normalize_messages([{"role": "user", "content": [{"type": "text"}]}])
    with pytest.raises(ValueError, match=r"'content' must be a string or a list"):
        normalize_messages([{"role": "user", "content": {"type": "text", "text": "a"}}])
    with pytest.raises(ValueError, match=r"content part must be a dict"):
        normalize_messages([{"role": "user", "content": ["just a string"]}])
    with pytest.raises(ValueError, match=r"'role' must be a non-empty string"):
        normalize_messages([{"role": 3, "content": "a"}])
    with pytest.raises(ValueError, match=r"message must be a dict"):
        normalize_messages(["hello"])
    with pytest.raises(ValueError, match=r"list of message dicts"):
        normalize_messages("hello")


def test_normalize_messages_infers_part_type(template):
    messages = [{"role": "user", "content": [{"image": "a.png"}, {"text": "hi"}]}]
    norm, sources = normalize_messages(messages)
    assert sources == ["a.png"]
    assert norm[0]["content"] == [{"type": "image", "image": "a.png"}, {"type": "text", "text": "hi"}]
    assert render_chat(template, norm) == render_chat(template, messages)
    assert messages[0]["content"][0] == {"image": "a.png"}  # input not modified


def test_raise_exception_and_tojson_in_sandbox():
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="boom"):
        render_chat("{{ raise_exception('boom') }}", [])
    assert render_chat("{{ messages[0] | tojson }}", [{"role": "user", "content": "<a & 'b'> é"}]) == (
        '{"role": "user", "content": "<a & \'b\'> é"}'
    )
    assert render_chat("{{ x | tojson(indent=2) }}", [], x={"k": 1}) == '{\n  "k": 1\n}'
    assert render_chat("{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{{ m.content }}{% endfor %}",
                       [{"role": "a", "content": "1"}, {"role": "b", "content": "2"}]) == "2"  # fmt: skip
    assert render_chat("{% generation %}gen{% endgeneration %}", []) == "gen"
    assert render_chat("{{ messages.__class__ }}", []) == ""  # sandboxed: unsafe attribute is undefined
    with pytest.raises(jinja2.exceptions.SecurityError, match="underscore-prefixed"):
        render_chat("{% set ns = namespace(_x=1) %}", [])
