"""The default image budget follows the model's context (issue 20): a 12 MP photo, which at the checkpoint's own
max_pixels would take 11,750 image tokens of the tiny model's 4,096, is scaled down to fit beside the text and
the answer instead of refused, and the answer says so (the API's `result.warnings`, the server's top-level
"warnings", the CLI's `note:` line). An explicit max_pixels still wins, and what does not fit under it is still
refused naming it.

The model is the tiny export with its context cut to 1,024 tokens in its manifest (the other files are the
export's, symlinked), so the fitted image (about 1,000 tokens) keeps the vision graph cheap; the photo would
take 11,750 tokens either way.
"""
from __future__ import annotations

import base64
import io
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from inprocess_server import InProcessServer, import_httpx  # noqa: E402

CONTEXT = 1024  # the test model's context
ANSWER = 8  # tokens asked for
PHOTO = (4000, 3000)  # width, height: a 12 MP phone photo


@pytest.fixture(scope="module")
def small_export(qwen_export, tmp_path_factory) -> str:
    """The tiny export with max_context 1024 (manifest edited, every other file a symlink)."""
    folder = tmp_path_factory.mktemp("context-1024")
    for name in os.listdir(qwen_export):
        if name != "manifest.json":
            os.symlink(os.path.join(qwen_export, name), folder / name)
    with open(os.path.join(qwen_export, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    manifest["text_config"]["max_context"] = CONTEXT
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return str(folder)


@pytest.fixture(scope="module")
def small(small_export):
    from vlm_core.runtime.model import VisionLanguageModel

    return VisionLanguageModel(small_export, threads=1)


def _photo():
    """A 4000x3000 RGB image (a smooth gradient, so its JPEG is small)."""
    import numpy as np
    from PIL import Image

    small = np.zeros((30, 40, 3), np.uint8)
    small[..., 0] = np.linspace(0, 255, 40)[None]
    small[..., 1] = np.linspace(0, 255, 30)[:, None]
    small[..., 2] = 90
    return Image.fromarray(small).resize(PHOTO)


@pytest.fixture(scope="module")
def photo_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("photo") / "phone.jpg")
    _photo().save(path, quality=85)
    return path


def _messages(image) -> list:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe it."}]}]


def test_fit_is_the_largest_budget_under_the_limit(small):
    """fit_pixel_budget: None when the checkpoint's budget fits; else a budget whose tokens fit while one token's
    worth more would not; min_pixels is a floor."""
    from vlm_core.models.qwen3_vl.preprocess import fit_pixel_budget, image_tokens_under

    params = small.family.image_params
    unit = (params.patch_size * params.merge_size) ** 2
    sizes = [(3000, 4000)]
    assert image_tokens_under(params, sizes, None, params.max_pixels) == 11750  # why the photo failed
    assert fit_pixel_budget(params, [(300, 400)], 1000) is None
    for limit, images in ((1000, sizes), (480, sizes), (900, [(3000, 4000), (200, 2000), (1080, 1920)])):
        budget = fit_pixel_budget(params, images, limit)
        assert budget % unit == 0
        assert image_tokens_under(params, images, None, budget) <= limit
        assert image_tokens_under(params, images, None, budget + unit) > limit
    assert fit_pixel_budget(params, sizes, 100, min_pixels=200 * unit) is None  # cannot fit: left to the context check
    assert fit_pixel_budget(params, sizes, 0) is None


def test_api_scales_a_12_mp_photo_to_fit_and_says_so(small, photo_path):
    from vlm_core.kernels.sampling import SamplingParams

    for image in (photo_path, _photo()):  # a path (its size from the header) and a PIL image
        result = small.generate(_messages(image), SamplingParams(greedy=True), max_new_tokens=ANSWER)
        assert result.prompt_tokens + ANSWER <= CONTEXT
        assert CONTEXT // 2 < result.image_tokens <= CONTEXT - ANSWER  # scaled to fit, not to nothing
        assert len(result.warnings) == 1 and result.warnings[0].startswith("images scaled down"), result.warnings
        assert "max_pixels" in result.warnings[0] and str(CONTEXT) in result.warnings[0]
        assert result.to_dict()["warnings"] == result.warnings


def test_a_photo_that_fits_is_not_scaled(small, photos):
    from vlm_core.kernels.sampling import SamplingParams

    result = small.generate(_messages(photos["coffee"]), SamplingParams(greedy=True), max_new_tokens=2)
    assert result.warnings == [] and "warnings" not in result.to_dict()


def test_an_explicit_max_pixels_still_wins(small, photo_path):
    """max_pixels given: no scaling; an image that does not fit under it is the context error naming max_pixels."""
    from vlm_core.errors import ContextLengthError
    from vlm_core.kernels.sampling import SamplingParams

    prompt = small.prepare(_messages(photo_path), max_pixels=1_000_000, max_new_tokens=100)
    assert prompt.warnings == [] and prompt.image_tokens == 972  # 864x1152: under the budget, over the context
    with pytest.raises(ContextLengthError, match="max_pixels"):
        small.generate(prompt, SamplingParams(greedy=True), max_new_tokens=100)


def test_cli_scales_a_12_mp_photo_with_a_note(small_export, photo_path, capsys):
    from vlm_core.runtime import generate

    argv = ["-m", small_export, "--threads", "1", "--image", photo_path, "-p", "Describe it.", "--greedy",
            "--max-new-tokens", str(ANSWER), "--json"]
    rc = generate.main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    out = json.loads(captured.out)
    assert out["prompt_tokens"] + ANSWER <= CONTEXT and out["warnings"]
    notes = [line for line in captured.err.splitlines() if line.startswith("note: images scaled down")]
    assert len(notes) == 1 and "--max-pixels" in notes[0], captured.err
    assert "Traceback" not in captured.err

    rc = generate.main(argv + ["--max-pixels", "1000000", "--max-new-tokens", "100"])  # explicit: refused as before, naming the flag
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert captured.err.startswith("error: ") and "--max-pixels" in captured.err and "context" in captured.err


@pytest.fixture(scope="module")
def server(small):
    from vlm_core.runtime.server.app import create_app
    from vlm_core.runtime.server.config import ServeConfig

    with InProcessServer(create_app(ServeConfig(model=small.folder, threads=1), small)) as running:
        yield running


def _body(**extra) -> dict:
    buffer = io.BytesIO()
    _photo().save(buffer, format="JPEG", quality=85)
    url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "Describe it."}]}],
            "max_tokens": ANSWER, "temperature": 0, **extra}


@pytest.mark.parametrize("max_tokens", [ANSWER, None])  # None: the server picks, with room for the answer kept
def test_server_scales_a_12_mp_photo_and_says_so(server, max_tokens):
    httpx = import_httpx()
    answer = httpx.post(server.url + "/v1/chat/completions", json=_body(max_tokens=max_tokens), timeout=120)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["usage"]["total_tokens"] <= CONTEXT
    if max_tokens is None:  # the default answer room (ANSWER_ROOM, a quarter of this context) was kept for it
        assert body["usage"]["prompt_tokens"] <= CONTEXT - CONTEXT // 4
    assert len(body["warnings"]) == 1 and body["warnings"][0].startswith("images scaled down"), body
    assert "max_pixels" in body["warnings"][0]


def test_server_stream_says_so_in_its_last_chunk(server):
    httpx = import_httpx()
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=_body(stream=True),
                      timeout=120) as answer:
        assert answer.status_code == 200
        events = [json.loads(line[6:]) for line in answer.iter_lines() if line.startswith("data: {")]
    finishing = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(finishing) == 1 and finishing[0]["warnings"][0].startswith("images scaled down")
    assert all("warnings" not in e for e in events if e is not finishing[0])


def test_server_explicit_max_pixels_is_refused_when_it_does_not_fit(server):
    httpx = import_httpx()
    answer = httpx.post(server.url + "/v1/chat/completions", json=_body(max_pixels=1_000_000, max_tokens=100), timeout=120)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "context_length_exceeded" and "max_pixels" in error["message"]
