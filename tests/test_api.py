"""The Python API: one loaded VisionLanguageModel answers many requests, streams, takes transformers'
processor message format, honours stop strings and seeds, and `--dump-inputs` writes the model inputs."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from vlm_core.kernels.sampling import SamplingParams

GREEDY = SamplingParams(greedy=True)


def _user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def test_one_model_answers_many_requests(vlm, photos):
    with_image = _user({"type": "image", "path": photos["astronaut"]}, _text("Describe the picture."))
    text_only = _user(_text("Describe the picture."))
    first = vlm.generate(with_image, GREEDY, max_new_tokens=6, min_new_tokens=6)
    other = vlm.generate(text_only, GREEDY, max_new_tokens=6, min_new_tokens=6)
    again = vlm.generate(with_image, GREEDY, max_new_tokens=6, min_new_tokens=6)
    assert len(first.token_ids) == len(other.token_ids) == 6
    assert first.finish_reason == "length"
    assert first.image_tokens > 0 and other.image_tokens == 0
    assert first.prompt_tokens == other.prompt_tokens + first.image_tokens + 2  # + vision start/end
    assert other.token_ids != first.token_ids  # the image changes the answer
    assert (again.token_ids, again.text) == (first.token_ids, first.text)  # no state leaks between requests


def test_stream_deltas_join_to_generate_text(vlm, photos):
    messages = _user({"type": "image", "image": photos["coffee"]}, _text("What is in this image?"))
    chunks = list(vlm.stream_generate(messages, GREEDY, max_new_tokens=12, min_new_tokens=12))
    result = vlm.generate(messages, GREEDY, max_new_tokens=12, min_new_tokens=12)
    assert "".join(c.text for c in chunks) == result.text
    assert [c.token_id for c in chunks if c.token_id is not None] == result.token_ids
    assert len(result.token_ids) == 12
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == result.finish_reason == "length"
    assert result.text == vlm.tokenizer.decode(result.token_ids, skip_special_tokens=True)


def test_processor_message_formats(vlm, photos):
    from PIL import Image

    path = photos["noise"]
    forms = {
        "image: PIL": {"type": "image", "image": Image.open(path)},
        "image: path string": {"type": "image", "image": path},
        "path": {"type": "image", "path": path},
        "image_url": {"type": "image_url", "image_url": {"url": path}},
    }
    prompts = {name: vlm.prepare(_user(part, _text("Describe."))) for name, part in forms.items()}
    reference = prompts["path"]
    assert reference.pixel_values is not None and reference.image_tokens > 0
    for name, prompt in prompts.items():
        np.testing.assert_array_equal(prompt.input_ids, reference.input_ids, err_msg=name)
        np.testing.assert_array_equal(prompt.pixel_values, reference.pixel_values, err_msg=name)
        np.testing.assert_array_equal(prompt.media_grid, reference.media_grid, err_msg=name)
    answers = {name: vlm.generate(prompt, GREEDY, max_new_tokens=4, min_new_tokens=4).token_ids
               for name, prompt in prompts.items()}
    assert all(ids == answers["path"] and len(ids) == 4 for ids in answers.values()), answers

    plain = vlm.prepare([{"role": "user", "content": "Hello"}])
    as_parts = vlm.prepare(_user(_text("Hello")))
    assert plain.pixel_values is None and plain.image_tokens == 0
    np.testing.assert_array_equal(plain.input_ids, as_parts.input_ids)
    assert len(vlm.generate([{"role": "user", "content": "Hello"}], GREEDY, max_new_tokens=3,
                            min_new_tokens=3).token_ids) == 3


def test_stop_string_cuts_the_text(vlm):
    messages = _user(_text("Describe the picture."))
    full = vlm.generate(messages, GREEDY, max_new_tokens=16, min_new_tokens=16)
    assert full.finish_reason == "length"
    # A stop string from the middle of the answer whose first occurrence is right there.
    stop = start = None
    for k in range(len(full.text) // 2, len(full.text) - 3):
        candidate = full.text[k:k + 3]
        if full.text.find(candidate) == k and "\ufffd" not in candidate and candidate.strip():
            stop, start = candidate, k
            break
    assert stop is not None, f"no usable stop string in {full.text!r}"
    cut = vlm.generate(messages, GREEDY, max_new_tokens=16, min_new_tokens=16, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:start]
    assert stop not in cut.text
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)] and len(cut.token_ids) < len(full.token_ids)


def test_seeded_sampling_is_reproducible(vlm, photos):
    messages = _user({"type": "image", "path": photos["astronaut"]}, _text("Describe the picture."))
    prompt = vlm.prepare(messages)

    def sample(seed):
        params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=seed)
        return vlm.generate(prompt, params, max_new_tokens=8, min_new_tokens=8).token_ids

    first, second, other = sample(7), sample(7), sample(8)
    greedy = vlm.generate(prompt, GREEDY, max_new_tokens=8, min_new_tokens=8).token_ids
    assert first == second
    assert other != first
    assert first != greedy  # it really sampled


def _transformers_answer(hf_model, hf_processor, vlm, messages, new_tokens):
    """transformers' greedy answer to `messages` (its processor's template and pixels), as text."""
    import torch

    inputs = hf_processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True,
                                              return_tensors="pt")
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(tokens) == new_tokens
    return vlm.tokenizer.decode(tokens, skip_special_tokens=True)


def test_ask(vlm, hf_model, hf_processor):
    """`ask` (one user turn: images then text, an optional system turn, greedy by default) against
    transformers' greedy answer to the same conversation written out by hand. The picture and prompt are ones
    the tiny random model answers in readable words (most give U+FFFD runs, which many answers share)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "astronaut.jpg")
    turn = _user({"type": "image", "path": path}, _text("Describe."))
    answer = vlm.ask("Describe.", images=[path], max_new_tokens=5, min_new_tokens=5)
    assert isinstance(answer, str) and "\ufffd" not in answer
    assert answer == _transformers_answer(hf_model, hf_processor, vlm, turn, 5)
    with_system = vlm.ask("Describe.", images=[path], system="Answer in French.", max_new_tokens=5,
                          min_new_tokens=5, sampling=GREEDY)
    system = [{"role": "system", "content": [_text("Answer in French.")]}]
    assert with_system == _transformers_answer(hf_model, hf_processor, vlm, system + turn, 5)
    assert with_system != answer  # the system turn reached the prompt


def test_dump_inputs_shapes(vlm, qwen_export, photos, tmp_path, capsys):
    from vlm_core.runtime.generate import main

    manifest = vlm.manifest
    vision = manifest["vision_config"]
    patch_dim = vision["in_channels"] * vision["temporal_patch_size"] * vision["patch_size"] ** 2
    merge = vision["spatial_merge_size"]
    dump = tmp_path / "inputs"
    images = [photos["astronaut"], photos["coffee"]]
    rc = main(["-m", qwen_export, "--threads", "1", "--image", images[0], "--image", images[1], "-p", "Compare.",
               "--greedy", "--max-new-tokens", "2", "--json", "--dump-inputs", str(dump)])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    arrays = {name: np.load(dump / f"{name}.npy") for name in
              ("input_ids", "position_ids", "pixel_values", "image_grid_thw")}
    assert sorted(os.listdir(dump)) == sorted(f"{name}.npy" for name in arrays)
    seq = result["prompt_tokens"]
    grid = arrays["image_grid_thw"]
    assert patch_dim == 1536
    assert arrays["input_ids"].shape == (1, seq) and arrays["input_ids"].dtype == np.int64
    assert arrays["position_ids"].shape == (3, 1, seq) and arrays["position_ids"].dtype == np.int64
    assert grid.shape == (2, 3) and grid.dtype == np.int64
    n_patches = int(grid.prod(-1).sum())
    assert arrays["pixel_values"].shape == (n_patches, patch_dim) and arrays["pixel_values"].dtype == np.float32
    image_token_id = manifest["special_tokens"]["image_token_id"]
    assert int((arrays["input_ids"] == image_token_id).sum()) == n_patches // merge ** 2 == result["image_tokens"]
    # The CLI feeds the model exactly what the API prepares for the same request.
    from vlm_core.runtime.chat.messages import build_user_messages

    prompt = vlm.prepare(build_user_messages("Compare.", images))
    for name, array in prompt.dump().items():
        np.testing.assert_array_equal(arrays[name], array, err_msg=name)


# ----------------------------------------------------------------------------- caller mistakes


def test_text_with_lone_surrogates_is_a_user_error_naming_the_parameter(vlm):
    """Lone surrogates (e.g. bytes decoded with surrogateescape) are not text: the tokenizer would raise
    TypeError; the API raises a UserError that says which part of `messages` holds one."""
    import pytest

    from vlm_core.errors import UserError

    cases = {
        "messages[0].content[1].text": _user(_text("fine"), _text("caf\udce9")),
        "messages[1].content": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "\ud800 hi"}],
    }
    for where, messages in cases.items():
        with pytest.raises(UserError) as exc:
            vlm.generate(messages, GREEDY, max_new_tokens=2)
        assert exc.value.param == "messages" and isinstance(exc.value, ValueError)
        assert str(exc.value).startswith(f"{where} is not valid text: a lone surrogate"), str(exc.value)
    with pytest.raises(UserError, match=r"^prompt .*U\+DCE9 at character 3 \(the byte 0xe9"):
        vlm.ask("caf\udce9", max_new_tokens=2)
    with pytest.raises(UserError, match="^system "):
        vlm.ask("hi", system="\udcff", max_new_tokens=2)


def test_empty_messages_is_a_user_error(vlm):
    import pytest

    from vlm_core.errors import UserError

    for call in (lambda: vlm.generate([], GREEDY, max_new_tokens=2), lambda: vlm.prepare([]),
                 lambda: list(vlm.stream_generate([], GREEDY, max_new_tokens=2))):
        with pytest.raises(UserError, match=r"^messages is empty; give at least one message$"):
            call()


def test_token_limits_and_stop_are_checked_naming_the_parameter(vlm):
    """max_new_tokens=-1 used to return an empty answer; now every entry point refuses it by name."""
    import pytest

    from vlm_core.errors import ParameterError

    messages = _user(_text("hi"))
    prompt = vlm.prepare(messages)
    entry_points = {
        "generate": lambda **kw: vlm.generate(messages, GREEDY, **kw),
        "stream_generate": lambda **kw: list(vlm.stream_generate(prompt, GREEDY, **kw)),
        "generate_step": lambda **kw: list(vlm.generate_step(prompt, GREEDY, **kw)),
        "ask": lambda **kw: vlm.ask("hi", sampling=GREEDY, **kw),
    }
    bad = [(dict(max_new_tokens=-1), "max_new_tokens", "max_new_tokens must be an integer >= 1, got -1"),
           (dict(max_new_tokens=0), "max_new_tokens", "got 0"),
           (dict(max_new_tokens=2.5), "max_new_tokens", "got 2.5"),
           (dict(max_new_tokens=4, min_new_tokens=-1), "min_new_tokens", "between 0 and max_new_tokens (4), got -1"),
           (dict(max_new_tokens=4, min_new_tokens=5), "min_new_tokens", "got 5")]
    for name, call in entry_points.items():
        for kwargs, param, text in bad:
            with pytest.raises(ParameterError) as exc:
                call(**kwargs)
            assert exc.value.param == param and text in str(exc.value), (name, kwargs, str(exc.value))
    for name in ("generate", "stream_generate", "ask"):
        with pytest.raises(ParameterError, match="^stop must be non-empty text"):
            entry_points[name](max_new_tokens=2, stop=[""])
    # One string is one stop text, not a list of one-character stop texts.
    full = vlm.generate(messages, GREEDY, max_new_tokens=8, min_new_tokens=8)
    stop = full.text[2:5]
    if stop.strip() and "\ufffd" not in stop:
        as_str = vlm.generate(messages, GREEDY, max_new_tokens=8, min_new_tokens=8, stop=stop)
        assert as_str.text == vlm.generate(messages, GREEDY, max_new_tokens=8, min_new_tokens=8, stop=[stop]).text


def test_sampling_params_errors_name_the_parameter():
    import pytest

    with pytest.raises(ValueError, match=r"^temperature must be a number from 0 to 2 \(0 = greedy\), got -1$"):
        SamplingParams(temperature=-1)


# ----------------------------------------------------------------------------- images as URLs


def _data_urls(path: str) -> dict:
    import base64
    import urllib.parse

    with open(path, "rb") as f:
        data = f.read()
    b64 = base64.b64encode(data).decode("ascii")
    return {
        "base64": f"data:image/png;base64,{b64}",
        "base64, no padding, line breaks": "data:image/png;base64," + "\n".join(
            b64.rstrip("=")[i:i + 76] for i in range(0, len(b64.rstrip("=")), 76)),
        "base64, percent-encoded": "data:image/png;base64," + urllib.parse.quote(b64, safe=""),
        "percent-encoded bytes": "data:image/png," + urllib.parse.quote_from_bytes(data),
        "no media type": f"data:;base64,{b64}",
    }


def test_data_url_image_parts_are_decoded(vlm, photos):
    """`image_url` / `url` / `image` parts holding a data: URL (and a bare `base64` part) give the same inputs
    as the file; they used to be read as a file path."""
    import base64

    path = photos["noise"]
    reference = vlm.prepare(_user({"type": "image", "path": path}, _text("Describe.")))
    parts = {}
    for name, url in _data_urls(path).items():
        parts[f"image_url, {name}"] = {"type": "image_url", "image_url": {"url": url}}
    url = _data_urls(path)["base64"]
    parts["url"] = {"type": "image", "url": url}
    parts["image"] = {"type": "image", "image": url}
    parts["image_url as a string"] = {"type": "image_url", "image_url": url}
    with open(path, "rb") as f:
        parts["bare base64"] = {"type": "image", "base64": base64.b64encode(f.read()).decode("ascii")}
    for name, part in parts.items():
        prompt = vlm.prepare(_user(part, _text("Describe.")))
        np.testing.assert_array_equal(prompt.input_ids, reference.input_ids, err_msg=name)
        np.testing.assert_array_equal(prompt.pixel_values, reference.pixel_values, err_msg=name)
    from vlm_core.kernels.image import (
        load_image,  # what every family's preprocessing calls
    )

    np.testing.assert_array_equal(np.asarray(load_image(url)), np.asarray(load_image(path)))


def test_bad_data_url_errors_are_short(vlm, photos):
    """A broken data URL is tens of KB: the message names it by its start and length, never in full."""
    import pytest

    from vlm_core.kernels.image import ImageError

    good = _data_urls(photos["astronaut"])["base64"]
    cases = {"invalid base64": (good[:-8] + "@@@@!!!!", "invalid base64"),
             "no comma": ("data:image/png;base64" + "A" * 40000, "no ','"),
             "not an image": ("data:image/png;base64," + "QUJD" * 10000, "not an image"),
             "bare base64 that is not base64": (None, "invalid base64")}
    for name, (url, fragment) in cases.items():
        part = {"type": "image", "base64": "%%" + "A" * 40000} if url is None else \
            {"type": "image_url", "image_url": {"url": url}}
        with pytest.raises(ImageError) as exc:
            vlm.prepare(_user(part, _text("Describe.")))
        message = str(exc.value)
        assert fragment in message and len(message) < 300 and "\n" not in message, (name, message)
        assert message.startswith("data:") and "characters)" in message, message  # named by its start and length


def test_remote_image_urls_are_fetched_only_when_allowed(qwen_export, vlm, photos):
    import functools
    import http.server
    import threading

    import pytest

    from vlm_core.kernels.image import ImageError
    from vlm_core.runtime.model import VisionLanguageModel

    folder = os.path.dirname(photos["coffee"])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=folder)
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        url_part = {"type": "image_url", "image_url": {"url": base + "coffee.png"}}
        with pytest.raises(ImageError, match=r"remote image URLs are not fetched unless enabled .*"
                                             r"allow_remote_images=True"):
            vlm.prepare(_user(url_part, _text("Describe.")))
        remote = VisionLanguageModel(qwen_export, threads=1, allow_remote_images=True)
        fetched = remote.prepare(_user(url_part, _text("Describe.")))
        local = vlm.prepare(_user({"type": "image", "path": photos["coffee"]}, _text("Describe.")))
        np.testing.assert_array_equal(fetched.pixel_values, local.pixel_values)
        with pytest.raises(ImageError, match="could not fetch the image .*404"):
            remote.prepare(_user({"type": "image", "url": base + "missing.png"}, _text("Describe.")))
    finally:
        server.shutdown()
        server.server_close()


def test_context_error_names_the_api_parameter(vlm):
    from vlm_core.errors import ContextLengthError

    with pytest.raises(ContextLengthError) as info:
        vlm.generate([{"role": "user", "content": "Hi"}], max_new_tokens=vlm.max_context * 2)
    message = str(info.value)
    assert "max_new_tokens" in message and "--" not in message
