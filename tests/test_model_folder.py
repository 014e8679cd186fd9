"""A broken model folder is refused when it is opened: one `error:` line from the CLI (exit 2, no traceback)
and a ModelFolderError from the Python API, each naming the file and the field at fault.

Each case is the tiny export with one file changed; the files a case leaves alone are symlinks to the
export's, so a case costs a few small files.
"""
from __future__ import annotations

import json
import os

import pytest

from vlm_core.errors import ModelFolderError


def _manifest_edit(change, replace: bool = False):
    """Edit manifest.json in place with `change(manifest)`, or with `replace` write what `change` returns."""
    def edit(folder):
        path = os.path.join(folder, "manifest.json")
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        result = change(manifest)
        manifest = result if replace else manifest
        os.remove(path)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(manifest, f)
    return edit


def _set(section, key, value):
    return _manifest_edit(lambda m: m[section].__setitem__(key, value))


def _write(name, data: bytes):
    def edit(folder):
        os.remove(os.path.join(folder, name))
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    return edit


def _truncate(name):
    def edit(folder):
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            head = f.read(4096)  # the .npy header (the full shape) and a little of the data
        os.remove(path)
        with open(path, "wb") as f:
            f.write(head)
    return edit


# name -> (the edit, fragments the error must contain)
CASES = {
    "graphs is a string": (_manifest_edit(lambda m: m.__setitem__("graphs", "x")), ["manifest.json", "graphs"]),
    "tokenizer is other JSON": (_write("tokenizer.json", b'{"x": 1}'), ["tokenizer.json", "tokenizer"]),
    "template does not compile": (_write("chat_template.jinja", b"{% for x in %}"),
                                  ["chat_template.jinja", "not valid Jinja", "line 1"]),
    "max_context -5": (_set("text_config", "max_context", -5), ["text_config.max_context", "-5", "positive"]),
    "num_layers three": (_set("text_config", "num_layers", "three"), ["text_config.num_layers", "'three'"]),
    "manifest is a list": (_manifest_edit(lambda m: [m], replace=True), ["manifest.json", "JSON list"]),
    "embeddings truncated": (_truncate("embed_tokens.npy"), ["embed_tokens.npy", "truncated"]),
    # the same checks hold for the other fields the runtime reads
    "rms_norm_eps nan": (_set("text_config", "rms_norm_eps", float("nan")), ["text_config.rms_norm_eps"]),
    "vision depth 0": (_set("vision_config", "depth", 0), ["vision_config.num_layers", "0"]),
    "decoder without a file": (_manifest_edit(lambda m: m["graphs"]["decoder"].pop("file")), ["graphs.decoder"]),
    "no decoder graph": (_manifest_edit(lambda m: m["graphs"].pop("decoder")), ["graphs", "decoder"]),
    "special_tokens a list": (_manifest_edit(lambda m: m.__setitem__("special_tokens", [1])), ["special_tokens"]),
    "eos ids not ints": (_set("special_tokens", "eos_token_ids", ["x"]), ["special_tokens.eos_token_ids"]),
    "no image token id": (_manifest_edit(lambda m: m["special_tokens"].pop("image_token_id")), ["lacks 'image_token_id'"]),
    "generation temperature hot": (_set("generation", "temperature", "hot"), ["generation.temperature", "'hot'"]),
    "embeddings shape mismatch": (_manifest_edit(lambda m: m["embeddings"].__setitem__("shape", [10, 64])),
                                  ["embed_tokens.npy", "[10, 64]"]),
    "template not UTF-8": (_write("chat_template.jinja", b"\xff{{ x }}"), ["chat_template.jinja", "UTF-8", "0xff"]),
    "tokenizer entry a number": (_manifest_edit(lambda m: m.__setitem__("tokenizer", 5)), ["tokenizer", "5"]),
    "preprocessing patch_size a list": (_set("preprocessing", "patch_size", [16]), ["preprocessing.patch_size"]),
    "video fps negative": (_set("video_preprocessing", "fps", -2), ["video_preprocessing.fps", "-2"]),
}


@pytest.fixture(scope="module")
def broken(qwen_export, tmp_path_factory) -> dict:
    """name -> a copy of the tiny export (symlinked files) with the case's edit applied."""
    root = tmp_path_factory.mktemp("broken-models")
    folders = {}
    for index, (name, (edit, _)) in enumerate(CASES.items()):
        folder = str(root / f"case{index}")
        os.makedirs(folder)
        for file in os.listdir(qwen_export):
            os.symlink(os.path.join(qwen_export, file), os.path.join(folder, file))
        edit(folder)
        folders[name] = folder
    return folders


@pytest.mark.parametrize("name", CASES)
def test_cli_says_what_is_broken_in_one_line(name, broken, capsys):
    from vlm_core.runtime import generate

    rc = generate.main(["-m", broken[name], "--threads", "1", "-p", "hi", "--max-new-tokens", "1"])
    captured = capsys.readouterr()
    assert rc == 2, captured.err
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for fragment in [os.path.basename(broken[name]), *CASES[name][1]]:  # the folder, then what is wrong in it
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


@pytest.mark.parametrize("name", CASES)
def test_api_raises_model_folder_error(name, broken):
    from vlm_core.runtime.model import VisionLanguageModel

    with pytest.raises(ModelFolderError) as error:
        VisionLanguageModel(broken[name], threads=1)
    for fragment in CASES[name][1]:
        assert fragment in str(error.value)


def test_the_unbroken_copy_loads(qwen_export, tmp_path):
    """The control: the symlinked copy with no edit opens (so each case fails for its own edit)."""
    from vlm_core.runtime.model import VisionLanguageModel

    for file in os.listdir(qwen_export):
        os.symlink(os.path.join(qwen_export, file), tmp_path / file)
    assert VisionLanguageModel(str(tmp_path), threads=1).max_context > 0


@pytest.mark.parametrize("threads", [0, -1, 100_000, 2.5, True])
def test_threads_out_of_range_is_refused_naming_threads(threads, qwen_export, monkeypatch):
    """Refused before any session starts (100,000 ONNX Runtime threads hung the machine)."""
    from vlm_core.errors import ParameterError
    from vlm_core.runtime import model
    from vlm_core.runtime.model import VisionLanguageModel

    def no_session(*args, **kwargs):
        raise AssertionError(f"a session was created with threads={threads!r}")

    monkeypatch.setattr(model, "create_session", no_session)
    with pytest.raises(ParameterError, match="^threads must be an integer from 1 to"):
        VisionLanguageModel(qwen_export, threads=threads)
