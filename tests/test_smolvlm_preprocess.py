"""SmolVLM preprocessing and prompt expansion vs transformers' SmolVLMProcessor (PIL image backend) on a tiny
checkpoint (64-pixel tiles, longest edge 128, 16 image tokens per tile).

Our pipeline makes the same Pillow calls on the same uint8 pixels and the same float64 -> float32 rescale and
float32 normalize, so pixel values must be bit-identical (`assert_array_equal`). Prompt ids: our jinja2 render
(runtime.chat.render_chat) + expand_images + `tokenizers` encode must equal the processor's
apply_chat_template(..., tokenize=True).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from vlm_core.models.smolvlm.preprocess import (
    SmolVLMImageParams,
    preprocess_images,
    tile_count,
)
from vlm_core.models.smolvlm.prompt import expand_images, image_prompt_string

transformers = pytest.importorskip("transformers")
pytest.importorskip("num2words")


@pytest.fixture(scope="module")
def checkpoint(smolvlm_checkpoint) -> str:
    return smolvlm_checkpoint  # the session's tiny checkpoint (tests/conftest.py), shared with the parity tests


@pytest.fixture(scope="module")
def processor(checkpoint):
    import smolvlm_helpers

    return smolvlm_helpers.hf_processor(checkpoint)


@pytest.fixture(scope="module")
def params(checkpoint) -> SmolVLMImageParams:
    with open(os.path.join(checkpoint, "preprocessor_config.json")) as f:
        return SmolVLMImageParams.from_dict(json.load(f))


@pytest.fixture(scope="module")
def images(photos, tmp_path_factory) -> dict:
    """Paths of the session photos plus wide, tall, small, greyscale, RGBA and palette images."""
    rng = np.random.default_rng(7)
    folder = tmp_path_factory.mktemp("smolvlm-images")
    rgb = lambda h, w: (rng.random((h, w, 3)) * 255).astype("uint8")  # noqa: E731
    made = {
        "wide": Image.fromarray(rgb(37, 301)),
        "tall": Image.fromarray(rgb(263, 29)),
        "small": Image.fromarray(rgb(30, 41)),
        "grey": Image.fromarray(rgb(90, 70)[..., 0], "L"),
        "rgba": Image.fromarray(np.dstack([rgb(70, 90), (rng.random((70, 90)) * 255).astype("uint8")]), "RGBA"),
        "palette": Image.fromarray(rgb(50, 66)).convert("P", palette=Image.Palette.ADAPTIVE),
        "big": Image.fromarray(rgb(150, 400)),  # > 4 tiles in a row after the resize (3 x 1 tiles)
    }
    paths = dict(photos)
    for name, image in made.items():
        paths[name] = str(folder / f"{name}.png")
        image.save(paths[name])
    return paths


def _reference(processor, sources, **kwargs):
    out = processor.image_processor([list(sources)], return_row_col_info=True, **kwargs)
    pixels = np.asarray(out["pixel_values"])[0]
    grid = np.array([out["rows"][0], out["cols"][0]], dtype=np.int64).T.reshape(-1, 2)
    assert np.all(np.asarray(out["pixel_attention_mask"]) == 1)  # one sample: no padding, all tiles full
    return pixels, grid


NAMES = ["astronaut", "coffee", "noise", "wide", "tall", "small", "grey", "rgba", "palette", "big"]


@pytest.mark.parametrize("name", NAMES)
def test_pixels_equal_transformers(processor, params, images, name):
    ours, grid = preprocess_images([images[name]], params)
    ref, ref_grid = _reference(processor, [images[name]])
    np.testing.assert_array_equal(grid, ref_grid)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)
    assert len(ours) == tile_count(*grid[0])


def test_pil_inputs_with_alpha_and_modes(processor, params, images):
    """PIL objects (RGBA composited onto white, greyscale, palette) and several images in one call."""
    sources = [Image.open(images[n]) for n in ("rgba", "grey", "palette", "astronaut")]
    for image in sources:
        image.load()
    ours, grid = preprocess_images(sources, params)
    ref, ref_grid = _reference(processor, sources)
    np.testing.assert_array_equal(grid, ref_grid)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("override", [{"do_image_splitting": False}, {"do_resize": False},
                                      {"do_resize": False, "do_image_splitting": False},
                                      {"size": {"longest_edge": 64}}, {"size": {"height": 100, "width": 140}},
                                      {"do_normalize": False}, {"do_rescale": False}])
def test_settings_equal_transformers(processor, params, images, override):
    sources = [images[n] for n in ("coffee", "small", "tall")]
    ours, grid = preprocess_images(sources, SmolVLMImageParams.from_dict({**params.to_dict(), **override}))
    ref, ref_grid = _reference(processor, sources, **override)
    np.testing.assert_array_equal(grid, ref_grid)
    np.testing.assert_array_equal(ours, ref)


def test_params_round_trip(params):
    assert SmolVLMImageParams.from_dict(params.to_dict()) == params
    assert params.tile == 64 and params.size == {"longest_edge": 128} and params.resample == 1
    assert SmolVLMImageParams.from_dict({"unknown": 1, "max_image_size": {"longest_edge": 512}}).tile == 512


def test_image_prompt_string_equals_transformers():
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    for rows, cols in [(0, 0), (1, 2), (3, 1), (2, 2)]:
        assert image_prompt_string(rows, cols, 5) == get_image_prompt_string(
            rows, cols, 5, fake_token_around_image="<fake_token_around_image>", image_token="<image>",
            global_image_token="<global-img>")


def test_expand_images_counts():
    with pytest.raises(ValueError, match="2 <image> placeholder.*1 image"):
        expand_images("a<image>b<image>", [(0, 0)], 4)
    assert expand_images("no images", [], 4) == "no images"


def _our_ids(checkpoint, messages, rows_cols, image_seq_len):
    from tokenizers import Tokenizer

    from vlm_core.runtime.chat.template import render_chat, special_tokens_from_config

    with open(os.path.join(checkpoint, "chat_template.jinja")) as f:
        template = f.read()
    with open(os.path.join(checkpoint, "tokenizer_config.json")) as f:
        specials = special_tokens_from_config(json.load(f))
    text = render_chat(template, messages, add_generation_prompt=True, **specials)
    text = expand_images(text, rows_cols, image_seq_len)
    tokenizer = Tokenizer.from_file(os.path.join(checkpoint, "tokenizer.json"))
    return tokenizer.encode(text, add_special_tokens=False).ids


def _their_ids(processor, messages):
    out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = out["input_ids"]
    return list(ids[0] if isinstance(ids[0], list) else ids)


@pytest.mark.parametrize("case", ["split", "two_images", "text_only", "no_split"])
def test_prompt_ids_equal_transformers(checkpoint, processor, params, images, case):
    image_seq_len = processor.image_seq_len
    assert image_seq_len == 16
    names = {"split": ["astronaut"], "two_images": ["coffee", "tall"], "text_only": [], "no_split": ["wide"]}[case]
    content = [{"type": "image", "path": images[n]} for n in names]
    content.append({"type": "text", "text": "What is in the picture? Answer in 3 words."})
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": content}]
    ours_params = params
    if case == "no_split":
        import smolvlm_helpers

        processor = smolvlm_helpers.hf_processor(checkpoint)
        processor.image_processor.do_image_splitting = False
        ours_params = SmolVLMImageParams.from_dict({**params.to_dict(), "do_image_splitting": False})
    _, rows_cols = preprocess_images([images[n] for n in names], ours_params)
    if case == "split":
        assert rows_cols[0].tolist() == [2, 2]
    if case == "no_split":
        assert rows_cols[0].tolist() == [0, 0]
    ours = _our_ids(checkpoint, messages, rows_cols, image_seq_len)
    theirs = _their_ids(processor, messages)
    assert ours == theirs
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert ours.count(image_id) == image_seq_len * sum(tile_count(r, c) for r, c in rows_cols)
