"""The CLI trial of issue 20 as a table: each row an argv (the bad invocations tried, and the ordinary ones that must
still work), the exit status it must give and the fragments its message must contain (the flag, or the file).

Rows run in-process through `generate.main(argv)` (argparse's usage errors as its SystemExit): one process, and
the tiny export loaded once (the harness hands the session's model to every row that names that folder; a row
with another folder loads it for real, so a broken folder fails as it would). Every row: the exit status, no
traceback, and for a refusal nothing on stdout and the fragments in its `error:` line (argparse's own errors come
after its usage lines).
"""
from __future__ import annotations

import io
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_model_folder import CASES as FOLDER_CASES  # noqa: E402  (the broken-folder edits, one per field)

OK, USAGE = 0, 2  # exit statuses: answered; refused (one `error:` line, or argparse's usage error)
PROMPT = ["-p", "Describe the picture."]
FEW = ["--max-new-tokens", "2", "--greedy"]  # keep the answering rows short


def _writer(folder: str):
    """write(name, data) -> the path of `data` written as `folder`/name."""
    def write(name: str, data: bytes) -> str:
        path = os.path.join(folder, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    return write


def _linked_copy(source: str, folder: str, leave_out: str | None = None) -> str:
    """`folder` made of symlinks to `source`'s files (all but `leave_out`)."""
    os.makedirs(folder)
    for file in os.listdir(source):
        if file != leave_out:
            os.symlink(os.path.join(source, file), os.path.join(folder, file))
    return folder


def _images(folder: str) -> dict:
    """name -> a file that is not a usable image (or is one, for the controls)."""
    from PIL import Image

    write = _writer(folder)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buffer, format="PNG")
    png = buffer.getvalue()
    paths = {"good jpeg": write("good.jpg", jpeg), "good png": write("good.png", png)}
    paths["truncated jpeg"] = write("cut.jpg", jpeg[: len(jpeg) // 2])
    paths["truncated png"] = write("cut.png", png[: len(png) // 2])
    paths["png header only"] = write("header.png", png[:40])
    paths["random bytes"] = write("noise.jpg", np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    paths["text file"] = write("notes.txt", b"These are notes, not an image.\n" * 20)
    paths["empty file"] = write("empty.png", b"")
    paths["svg"] = write("drawing.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    paths["pdf"] = write("paper.pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj <<>> endobj\n")
    paths["html"] = write("page.png", b"<!doctype html><html><body>not a png</body></html>")
    for name, size in (("wide", (2010, 10)), ("tall", (10, 2010))):  # aspect ratio 201
        path = os.path.join(folder, f"{name}.png")
        Image.new("RGB", size, (200, 30, 30)).save(path)
        paths[name] = path
    paths["folder"] = os.path.join(folder, "a-folder.png")
    os.makedirs(paths["folder"])
    paths["missing"] = os.path.join(folder, "no-such-photo.jpg")
    frames = [Image.new("RGB", (48, 40), (40 * i, 90, 200 - 30 * i)) for i in range(6)]
    paths["clip"] = os.path.join(folder, "clip.gif")
    frames[0].save(paths["clip"], save_all=True, append_images=frames[1:], duration=100)
    with open(paths["clip"], "rb") as f:
        gif = f.read()
    paths["truncated clip"] = write("cut.gif", gif[: len(gif) // 2])
    paths["empty frames folder"] = os.path.join(folder, "no-frames")
    os.makedirs(paths["empty frames folder"])
    return paths


def _folders(qwen_export: str, root: str) -> dict:
    """name -> a model folder: the broken ones of test_model_folder (symlinked copies, one edit each) and more."""
    folders = {}
    for index, (name, (edit, _)) in enumerate(FOLDER_CASES.items()):
        folder = _linked_copy(qwen_export, os.path.join(root, f"broken{index}"))
        edit(folder)
        folders[name] = folder
    folders["not a model"] = os.path.join(root, "not-a-model")
    os.makedirs(folders["not a model"])
    folders["missing"] = os.path.join(root, "no-such-model")
    folders["a file"] = os.path.join(root, "a-file.txt")
    with open(folders["a file"], "w", encoding="utf-8") as f:
        f.write("not a folder\n")
    for name, drop in (("no decoder graph file", "decoder.onnx"), ("no tokenizer", "tokenizer.json")):
        folders[name] = _linked_copy(qwen_export, os.path.join(root, name.replace(" ", "-")), leave_out=drop)
    return folders


def _files(tmp: str) -> dict:
    """name -> a prompt, schema or output path the rows use."""
    write = _writer(tmp)
    return {"tmp": tmp, "empty": write("empty.txt", b""),
            "latin1": write("latin1.txt", "Beschreibe das Bild, schön.".encode("latin-1")),
            "prompt": write("prompt.txt", b"Describe the picture.\n"), "not json": write("schema.txt", b"{not json"),
            "a list": write("list.json", b"[1, 2]")}


class _Placeholders(dict):
    """Any key -> the key itself: the table's shape without its files (for the parameter names)."""

    def __missing__(self, key):
        return key


def _rows(model: str, images: dict, folders: dict, files: dict) -> dict:
    """name -> (argv, stdin bytes or a path or None, exit status, fragments)."""
    tmp = files["tmp"]
    good = images["good jpeg"]
    base = ["-m", model, "--threads", "1"]
    image = [*base, "--image", good, *PROMPT]
    text = [*base, *PROMPT]
    clip = [*base, "--video", images["clip"], "-p", "What happens?"]
    rows = {}

    # broken model folders: one error naming the folder and what is wrong in it
    for name, (_, fragments) in FOLDER_CASES.items():
        rows[f"folder: {name}"] = (["-m", folders[name], *PROMPT], None, USAGE,
                                   [os.path.basename(folders[name]), *fragments])
    rows["folder: not a model"] = (["-m", folders["not a model"], *PROMPT], None, USAGE, ["not-a-model", "manifest.json"])
    rows["folder: missing"] = (["-m", folders["missing"], *PROMPT], None, USAGE, ["no-such-model"])
    rows["folder: a file"] = (["-m", folders["a file"], *PROMPT], None, USAGE, ["a-file.txt", "not an exported model"])
    rows["folder: no decoder graph file"] = (["-m", folders["no decoder graph file"], *PROMPT], None, USAGE,
                                             ["decoder.onnx"])
    rows["folder: no tokenizer"] = (["-m", folders["no tokenizer"], *PROMPT], None, USAGE, ["tokenizer.json"])

    # images: every error names --image and the file
    for name in ("truncated jpeg", "truncated png", "png header only", "random bytes", "text file", "empty file", "svg",
                 "pdf", "html", "wide", "tall", "folder", "missing"):
        rows[f"image: {name}"] = ([*base, "--image", images[name], *PROMPT], None, USAGE,
                                  ["--image", os.path.basename(images[name])])
    rows["image: second of two bad"] = ([*base, "--image", good, "--image", images["text file"], *PROMPT], None, USAGE,
                                        ["--image", "notes.txt"])
    for name in ("good jpeg", "good png"):
        rows[f"ok: image {name}"] = ([*base, "--image", images[name], *PROMPT, *FEW], None, OK, [])
    rows["ok: two images"] = ([*base, "--image", good, "--image", images["good png"], *PROMPT, *FEW], None, OK, [])
    rows["ok: image, empty prompt"] = ([*base, "--image", good, "-p", "", *FEW], None, OK, [])

    # videos
    rows["video: missing"] = ([*base, "--video", images["missing"], "-p", "Go"], None, USAGE, ["--video", "no-such"])
    rows["video: truncated GIF"] = ([*base, "--video", images["truncated clip"], "-p", "Go"], None, USAGE,
                                    ["--video", "cut.gif", "truncated"])
    rows["video: text file"] = ([*base, "--video", images["text file"], "-p", "Go"], None, USAGE,
                                ["--video", "notes.txt"])
    rows["video: empty frames folder"] = ([*base, "--video", images["empty frames folder"], "-p", "Go"], None, USAGE,
                                          ["--video", "no-frames"])
    for flag, values in (("--video-fps", ["0", "-1", "1e30", "nan", "inf"]), ("--video-max-frames", ["0", "-3"]),
                         ("--video-max-pixels", ["0", "-1"])):
        for value in values:
            rows[f"video: {flag} {value}"] = ([*clip, flag, value], None, USAGE, [flag])
        rows[f"video: {flag} without --video"] = ([*text, flag, "2"], None, USAGE, [flag, "no --video"])
    rows["ok: video"] = ([*clip, *FEW], None, OK, [])
    rows["ok: video with a budget"] = ([*clip, "--video-fps", "2", "--video-max-frames", "4", *FEW], None, OK, [])

    # sampling and length flags: out of range, non-finite, not numbers
    bad = {"--temperature": ["-1", "2.5", "1e30", "nan", "inf"], "--top-p": ["0", "1.5", "-0.1", "nan"],
           "--top-k": ["-2", "-5", "100000000000000000000"], "--min-p": ["2", "-1", "nan"],
           "--repetition-penalty": ["0", "-1", "1e308", "nan"], "--max-new-tokens": ["0", "-1", "1000000"],
           "--min-new-tokens": ["-1"], "--logprobs": ["21", "-1"]}
    for flag, values in bad.items():
        for value in values:
            extra = ["--json"] if flag == "--logprobs" else []
            rows[f"flag: {flag} {value}"] = ([*image, flag, value, *extra], None, USAGE, [flag])
    for flag in ("--temperature", "--top-p", "--top-k", "--max-new-tokens", "--threads", "--seed", "--max-pixels"):
        rows[f"usage: {flag} not a number"] = ([*image, flag, "abc"], None, USAGE, [flag, "invalid"])
    rows["flag: --min-new-tokens over --max-new-tokens"] = ([*image, "--max-new-tokens", "4", "--min-new-tokens", "9"],
                                                            None, USAGE, ["--min-new-tokens", "--max-new-tokens"])
    rows["flag: --logprobs without --json"] = ([*image, "--logprobs", "2"], None, USAGE, ["--logprobs", "--json"])
    good_values = {"--temperature": ["0", "0.7", "2"], "--top-p": ["1", "0.5"], "--top-k": ["0", "1", "50"],
                   "--min-p": ["0", "0.1"], "--repetition-penalty": ["1", "1.3"], "--seed": ["0", "7"]}
    for flag, values in good_values.items():
        for value in values:
            rows[f"ok: {flag} {value}"] = ([*image, flag, value, "--max-new-tokens", "2"], None, OK, [])
    rows["ok: --logprobs 3 --json"] = ([*image, *FEW, "--logprobs", "3", "--json"], None, OK, [])
    rows["ok: --min-new-tokens 2"] = ([*image, *FEW, "--min-new-tokens", "2"], None, OK, [])

    # budgets: pixels and threads
    for flag, values in (("--max-pixels", ["0", "-1", "1", "1023", "1000000000000"]),
                         ("--min-pixels", ["0", "-1", "1000000000000"])):
        for value in values:
            rows[f"budget: {flag} {value}"] = ([*image, flag, value], None, USAGE, [flag])
    rows["budget: --min-pixels over --max-pixels"] = ([*image, "--min-pixels", "5000", "--max-pixels", "4096"], None,
                                                      USAGE, ["--min-pixels", "--max-pixels"])
    for value in ("0", "-1", "100000"):
        rows[f"budget: --threads {value}"] = ([*PROMPT, "-m", model, "--threads", value], None, USAGE, ["--threads"])
    rows["ok: --max-pixels 65536"] = ([*image, "--max-pixels", "65536", *FEW], None, OK, [])
    rows["ok: --min-pixels 4096"] = ([*image, "--min-pixels", "4096", *FEW], None, OK, [])
    rows["ok: --threads 2"] = (["-m", model, "--threads", "2", *PROMPT, *FEW], None, OK, [])

    # prompts: empty, not UTF-8, endless, too long
    empty, latin1, prompt_file = files["empty"], files["latin1"], files["prompt"]
    rows["prompt: -p ''"] = ([*base, "-p", ""], None, USAGE, ["-p/--prompt", "empty"])
    rows["prompt: -p blank"] = ([*base, "-p", "  \n "], None, USAGE, ["-p/--prompt", "empty"])
    rows["prompt: -p - </dev/null"] = ([*base, "-p", "-"], b"", USAGE, ["-p -", "standard input", "empty"])
    rows["prompt: empty --prompt-file"] = ([*base, "--prompt-file", empty], None, USAGE, ["--prompt-file", "empty"])
    rows["prompt: empty -p @FILE"] = ([*base, "-p", "@" + empty], None, USAGE, ["-p @FILE", "empty"])
    rows["prompt: -p not UTF-8"] = ([*base, "-p", "caf\udce9"], None, USAGE, ["-p/--prompt", "0xe9", "UTF-8"])
    rows["prompt: --system not UTF-8"] = ([*text, "--system", "be \udcff brief"], None, USAGE, ["--system", "0xff"])
    rows["prompt: --stop not UTF-8"] = ([*text, "--stop", "\udcff"], None, USAGE, ["--stop", "0xff", "UTF-8"])
    rows["prompt: --stop empty"] = ([*text, "--stop", ""], None, USAGE, ["--stop", "empty"])
    rows["prompt: --prompt-file not UTF-8"] = ([*base, "--prompt-file", latin1], None, USAGE,
                                               ["--prompt-file", "latin1.txt", "UTF-8"])
    rows["prompt: stdin not UTF-8"] = ([*base, "-p", "-"], b"caf\xe9", USAGE, ["-p -", "UTF-8"])
    rows["prompt: -p @missing"] = ([*base, "-p", "@" + os.path.join(tmp, "nope.txt")], None, USAGE,
                                   ["-p @FILE", "nope.txt", "not found"])
    rows["prompt: --prompt-file missing"] = ([*base, "--prompt-file", os.path.join(tmp, "nope.txt")], None, USAGE,
                                             ["--prompt-file", "nope.txt", "not found"])
    rows["prompt: --prompt-file a folder"] = ([*base, "--prompt-file", tmp], None, USAGE, ["--prompt-file", "folder"])
    rows["prompt: -p @/dev/zero"] = ([*base, "-p", "@/dev/zero"], None, USAGE, ["-p @FILE", "/dev/zero", "16 MiB"])
    rows["prompt: --prompt-file /dev/urandom"] = ([*base, "--prompt-file", "/dev/urandom"], None, USAGE,
                                                  ["--prompt-file", "/dev/urandom", "16 MiB"])
    rows["prompt: -p - </dev/zero"] = ([*base, "-p", "-"], "/dev/zero", USAGE, ["-p -", "standard input", "16 MiB"])
    rows["prompt: over the context"] = ([*base, "-p", "word " * 5000, "--max-new-tokens", "4"], None, USAGE,
                                        ["context", "shorten the prompt"])
    rows["prompt: --max-new-tokens over the context"] = ([*image, "--max-new-tokens", "4090"], None, USAGE,
                                                         ["context", "--max-new-tokens"])
    rows["ok: -p @FILE"] = ([*base, "-p", "@" + prompt_file, *FEW], None, OK, [])
    rows["ok: --prompt-file"] = ([*base, "--prompt-file", prompt_file, *FEW], None, OK, [])
    rows["ok: -p -"] = ([*base, "-p", "-", *FEW], b"Describe the picture.\n", OK, [])
    rows["ok: -p @@literal"] = ([*base, "-p", "@@home", *FEW], None, OK, [])
    rows["ok: --system and --stop"] = ([*text, "--system", "Be brief.", "--stop", "###", *FEW], None, OK, [])
    rows["ok: --json"] = ([*image, *FEW, "--json"], None, OK, [])

    # response formats
    not_json, a_list = files["not json"], files["a list"]
    rows["format: --json-schema /dev/zero"] = ([*text, "--json-schema", "/dev/zero"], None, USAGE,
                                               ["--json-schema", "/dev/zero", "1 MiB"])
    rows["format: --grammar /dev/zero"] = ([*text, "--grammar", "/dev/zero"], None, USAGE,
                                           ["--grammar", "/dev/zero", "1 MiB"])
    rows["format: --json-schema not JSON"] = ([*text, "--json-schema", not_json], None, USAGE,
                                              ["--json-schema", "not valid JSON"])
    rows["format: --json-schema a list"] = ([*text, "--json-schema", a_list], None, USAGE, ["--json-schema", "list"])
    rows["format: --json-schema missing"] = ([*text, "--json-schema", os.path.join(tmp, "nope.json")], None, USAGE,
                                             ["--json-schema", "nope.json", "not found"])
    rows["format: --grammar missing"] = ([*text, "--grammar", os.path.join(tmp, "nope.lark")], None, USAGE,
                                         ["--grammar", "nope.lark", "not found"])
    rows["usage: --json-schema with --json-object"] = ([*text, "--json-object", "--json-schema", a_list], None, USAGE,
                                                       ["--json-schema", "not allowed"])

    # outputs
    rows["output: --dump-inputs a file"] = ([*image, "--dump-inputs", latin1], None, USAGE,
                                            ["--dump-inputs", "latin1.txt", "not a folder"])
    rows["output: --draw-boxes without an image"] = ([*text, "--draw-boxes", os.path.join(tmp, "b.png")], None, USAGE,
                                                     ["--draw-boxes", "--image"])
    rows["output: --draw-boxes a folder"] = ([*image, "--draw-boxes", tmp], None, USAGE, ["--draw-boxes", "folder"])
    rows["output: --draw-boxes in a missing folder"] = ([*image, "--draw-boxes", os.path.join(tmp, "no", "b.png")],
                                                        None, USAGE, ["--draw-boxes", "does not exist"])
    rows["output: --draw-boxes no image format"] = ([*image, "--draw-boxes", os.path.join(tmp, "b.txt")], None, USAGE,
                                                    ["--draw-boxes", "extension"])
    rows["ok: --dump-inputs"] = ([*image, *FEW, "--dump-inputs", os.path.join(tmp, "dump")], None, OK, [])
    rows["ok: --draw-boxes"] = ([*image, *FEW, "--draw-boxes", os.path.join(tmp, "boxes.png")], None, OK, [])

    # the command line itself (argparse)
    rows["usage: no -m"] = ([*PROMPT], None, USAGE, ["-m/--model", "required"])
    rows["usage: no prompt"] = ([*base], None, USAGE, ["-p/--prompt", "required"])
    rows["usage: unknown flag"] = ([*text, "--frobnicate"], None, USAGE, ["--frobnicate"])
    rows["usage: -p and --prompt-file"] = ([*text, "--prompt-file", prompt_file], None, USAGE,
                                           ["--prompt-file", "not allowed"])
    return rows


@pytest.fixture(scope="module")
def table(qwen_export, tmp_path_factory) -> dict:
    images, models, files = (str(tmp_path_factory.mktemp(name)) for name in ("trial-media", "trial-models", "trial"))
    return _rows(qwen_export, _images(images), _folders(qwen_export, models), _files(files))


@pytest.fixture(scope="module")
def shared_model(vlm, qwen_export):
    """Every row naming the tiny export gets the session's loaded model (its --threads checked as always); other
    folders are opened for real."""
    from vlm_core.runtime import model

    real = model.VisionLanguageModel

    def load(folder, threads=None, **kwargs):
        if folder == qwen_export:
            from vlm_core.runtime.engine.onnx_sessions import check_threads

            check_threads(threads)
            return vlm
        return real(folder, threads=threads, **kwargs)

    model.VisionLanguageModel = load
    yield
    model.VisionLanguageModel = real


def _run(argv: list, stdin, monkeypatch, capsys) -> tuple[int, str, str]:
    from vlm_core.runtime import generate

    if isinstance(stdin, str):  # a path: /dev/zero
        source = open(stdin, "rb")  # noqa: SIM115 (closed below)
    else:
        source = io.BytesIO(stdin or b"")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(source))
    try:
        rc = generate.main(argv)
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    finally:
        source.close()
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _names() -> list:
    """The row names, known before the fixtures run (the table's keys with placeholder paths)."""
    return list(_rows("MODEL", _Placeholders(), _Placeholders(), _Placeholders()))


@pytest.mark.parametrize("name", _names())
def test_cli_trial(name, table, shared_model, monkeypatch, capsys):
    argv, stdin, status, fragments = table[name]
    rc, out, err = _run(argv, stdin, monkeypatch, capsys)
    report = f"rc={rc}\nstdout={out[:300]!r}\nstderr={err[:600]!r}"
    assert rc == status, report
    assert "Traceback" not in err and "Traceback" not in out, report
    if status == OK:
        return
    assert out == "", report
    lines = [line for line in err.strip().splitlines() if "error: " in line]
    assert len(lines) == 1, report  # one error line (argparse's comes after its usage lines)
    line = lines[0]
    assert len(line) < 600, report  # a message, not a dump
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in the error line\n{report}"


def test_the_table_is_broad():
    names = _names()
    assert len(names) >= 100 and len(set(names)) == len(names)
    assert sum(name.startswith("ok: ") for name in names) >= 20
