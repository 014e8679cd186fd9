"""The Python API: one loaded VisionLanguageModel answers many requests, streams, takes transformers'
processor message format, honours stop strings and seeds, and `--dump-inputs` writes the model inputs."""
from __future__ import annotations

import json
import os

import numpy as np

from kernels.sampling import SamplingParams

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
        np.testing.assert_array_equal(prompt.image_grid_thw, reference.image_grid_thw, err_msg=name)
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


def test_ask(vlm, photos):
    from runtime.chat import build_user_messages

    answer = vlm.ask("Describe the picture.", images=[photos["coffee"]], max_new_tokens=5, min_new_tokens=5)
    expected = vlm.generate(build_user_messages("Describe the picture.", [photos["coffee"]]), max_new_tokens=5,
                            min_new_tokens=5)
    assert isinstance(answer, str)
    assert answer == expected.text
    assert len(expected.token_ids) == 5
    with_system = vlm.ask("Describe the picture.", images=[photos["coffee"]], system="Answer in French.",
                          max_new_tokens=5, min_new_tokens=5, sampling=GREEDY)
    system_messages = build_user_messages("Describe the picture.", [photos["coffee"]], system="Answer in French.")
    assert system_messages[0]["role"] == "system"
    assert with_system == vlm.generate(system_messages, GREEDY, max_new_tokens=5, min_new_tokens=5).text


def test_dump_inputs_shapes(vlm, qwen_export, photos, tmp_path, capsys):
    from runtime.generate import main

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
    from runtime.chat import build_user_messages

    prompt = vlm.prepare(build_user_messages("Compare.", images))
    for name, array in prompt.dump().items():
        np.testing.assert_array_equal(arrays[name], array, err_msg=name)
