"""`python -m vlm_core.runtime.generate` on bad input: one clear `error:` line on stderr, a non-zero exit,
nothing on stdout, no traceback.

Every case runs as a real subprocess (the user's view); they are independent, so they run in
parallel once per module and each test only checks its own result.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _generate(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlm_core.runtime.generate", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)


def _copy_model(src: str, dst: str, edit=None) -> str:
    shutil.copytree(src, dst)
    if edit:
        edit(dst)
    return dst


def _set_format_version(folder: str) -> None:
    path = os.path.join(folder, "manifest.json")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    manifest["format_version"] = 99
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f)


def _write_images(folder: str, photos: dict) -> dict:
    from PIL import Image

    paths = {}
    real_jpeg = os.path.join(folder, "real.jpg")
    Image.open(photos["astronaut"]).convert("RGB").save(real_jpeg, quality=90)
    with open(real_jpeg, "rb") as f:
        data = f.read()
    paths["truncated"] = os.path.join(folder, "truncated.jpg")
    with open(paths["truncated"], "wb") as f:
        f.write(data[: len(data) // 2])
    paths["corrupt"] = os.path.join(folder, "corrupt.jpg")
    with open(paths["corrupt"], "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    paths["text"] = os.path.join(folder, "notes.txt")
    with open(paths["text"], "w", encoding="utf-8") as f:
        f.write("These are notes, not an image.\n" * 20)
    paths["wide"] = os.path.join(folder, "wide.png")
    Image.new("RGB", (2010, 10), (200, 30, 30)).save(paths["wide"])  # aspect ratio 201
    paths["missing"] = os.path.join(folder, "no-such-photo.jpg")
    frames = [Image.new("RGB", (48, 40), (40 * i, 90, 200 - 30 * i)) for i in range(6)]
    paths["clip"] = os.path.join(folder, "clip.gif")
    frames[0].save(paths["clip"], save_all=True, append_images=frames[1:], duration=100)
    with open(paths["clip"], "rb") as f:
        data = f.read()
    paths["truncated clip"] = os.path.join(folder, "cut.gif")
    with open(paths["truncated clip"], "wb") as f:
        f.write(data[: len(data) // 2])  # three frames parse, the fourth is cut
    paths["empty"] = os.path.join(folder, "empty.txt")
    open(paths["empty"], "wb").close()
    return paths


@pytest.fixture(scope="module")
def cases(qwen_export, photos, tmp_path_factory) -> dict:
    """name -> (argv, fragments the error line must contain)."""
    tmp = tmp_path_factory.mktemp("cli-errors")
    images = _write_images(str(tmp), photos)
    with open(os.path.join(qwen_export, "manifest.json"), encoding="utf-8") as f:
        max_context = json.load(f)["text_config"]["max_context"]
    not_a_model = str(tmp / "not-a-model")
    os.makedirs(not_a_model)
    with open(os.path.join(not_a_model, "weights.bin"), "wb") as f:
        f.write(b"\0" * 16)
    bad_version = _copy_model(qwen_export, str(tmp / "bad-version"), _set_format_version)
    no_decoder = _copy_model(qwen_export, str(tmp / "no-decoder"),
                             lambda d: os.remove(os.path.join(d, "decoder.onnx")))

    def junk_decoder(folder):
        with open(os.path.join(folder, "decoder.onnx"), "wb") as f:
            f.write(b"this is not a protobuf\x00\xff" * 64)

    corrupt_decoder = _copy_model(qwen_export, str(tmp / "corrupt-decoder"), junk_decoder)

    good = photos["astronaut"]
    base = ["-m", qwen_export, "--threads", "1", "--image", good, "-p", "Describe the picture."]

    def on(model, image=good, *extra):
        return ["-m", model, "--threads", "1", "--image", image, "-p", "Describe the picture.", *extra]

    long_prompt = "word " * (max_context + 100)
    a_file = str(tmp / "a-file.txt")
    with open(a_file, "w", encoding="utf-8") as f:
        f.write("not a folder\n")
    latin1_prompt = str(tmp / "latin1-prompt.txt")
    with open(latin1_prompt, "wb") as f:
        f.write("Beschreibe das Bild, schön.".encode("latin-1"))
    text_only = ["-m", qwen_export, "--threads", "1"]
    clip = ["-m", qwen_export, "--threads", "1", "--video", images["clip"], "-p", "What happens?"]
    return {
        "missing image": (on(qwen_export, images["missing"]), ["--image", "no-such-photo.jpg", "not"]),
        "corrupt image": (on(qwen_export, images["corrupt"]), ["--image", "corrupt.jpg", "not an image"]),
        "truncated jpeg": (on(qwen_export, images["truncated"]), ["--image", "truncated.jpg", "truncated"]),
        "text file as image": (on(qwen_export, images["text"]), ["--image", "notes.txt", "not an image"]),
        "empty file as image": (on(qwen_export, images["empty"]), ["--image", "empty.txt", "not an image"]),
        "folder is not a model": (on(not_a_model), ["not-a-model", "manifest.json"]),
        "unknown format_version": (on(bad_version), ["format_version", "99", "re-export"]),
        "missing graph": (on(no_decoder), ["decoder.onnx", "missing"]),
        "corrupt graph": (on(corrupt_decoder), ["decoder.onnx", "cannot be loaded"]),
        "max-new-tokens over context": (base + ["--max-new-tokens", str(max_context * 4)],
                                        ["context", str(max_context), "--max-new-tokens"]),
        "prompt over context": (["-m", qwen_export, "--threads", "1", "-p", long_prompt, "--max-new-tokens", "4"],
                                ["context", str(max_context), "shorten the prompt"]),
        "top-p 1.5": (base + ["--top-p", "1.5"], ["--top-p", "1.5"]),
        "temperature -1": (base + ["--temperature", "-1"], ["--temperature", "-1"]),
        "top-k -2": (base + ["--top-k", "-2"], ["--top-k", "-2"]),
        "min-p 2": (base + ["--min-p", "2"], ["--min-p", "2"]),
        "repetition-penalty 0": (base + ["--repetition-penalty", "0"], ["--repetition-penalty", "0"]),
        "min-new-tokens over max": (base + ["--max-new-tokens", "4", "--min-new-tokens", "9"],
                                    ["--min-new-tokens", "--max-new-tokens", "9"]),
        "aspect ratio over 200": (on(qwen_export, images["wide"]), ["--image", "wide.png", "aspect ratio", "200"]),
        # argv bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape); subprocess
        # turns these strings back into those bytes.
        "-p not UTF-8": (text_only + ["-p", "caf\udce9 au lait"], ["-p/--prompt", "0xe9", "UTF-8"]),
        "--system not UTF-8": (text_only + ["-p", "hi", "--system", "be \udcff brief"],
                               ["--system", "0xff", "UTF-8"]),
        "--dump-inputs is a file": (base + ["--dump-inputs", a_file], ["--dump-inputs", "a-file.txt", "not a folder"]),
        "-p @FILE missing": (text_only + ["-p", "@" + str(tmp / "no-such-prompt.txt")],
                             ["-p", "no-such-prompt.txt", "not found"]),
        "--prompt-file missing": (text_only + ["--prompt-file", str(tmp / "no-such-prompt.txt")],
                                  ["--prompt-file", "no-such-prompt.txt", "not found"]),
        "--prompt-file not UTF-8": (text_only + ["--prompt-file", latin1_prompt],
                                    ["--prompt-file", "latin1-prompt.txt", "UTF-8", "0xf6"]),
        "-m is a file": (["-m", a_file, "-p", "hi"], ["a-file.txt", "is a file", "not an exported model folder"]),
        "--stop empty": (base + ["--stop", ""], ["--stop", "empty"]),
        # nothing to answer: no text and no image
        "-p empty": (text_only + ["-p", ""], ["-p/--prompt", "empty"]),
        "-p blank": (text_only + ["-p", "  \n "], ["-p/--prompt", "empty"]),
        "-p - empty stdin": (text_only + ["-p", "-"], ["-p -", "standard input", "empty"]),
        "--prompt-file empty": (text_only + ["--prompt-file", images["empty"]],
                                ["--prompt-file", "empty.txt", "empty"]),
        "--stop not UTF-8": (base + ["--stop", "\udcff"], ["--stop", "0xff", "UTF-8"]),
        "temperature 1e30": (base + ["--temperature", "1e30"], ["--temperature", "from 0 to 2", "1e+30"]),
        "top-k 1e20": (base + ["--top-k", "100000000000000000000"], ["--top-k", "100000000000000000000"]),
        # image budgets: at least one image token, at most the context's worth (--min-pixels 10^12 grew an image
        # to 22 GB: that case runs in-process with the resize forbidden, test_min_pixels_over_the_context_...)
        "max-pixels 1": (base + ["--max-pixels", "1"], ["--max-pixels", "at least", "one image token"]),
        "max-pixels 1e12": (base + ["--max-pixels", "1000000000000"], ["--max-pixels", "at most", "context"]),
        "threads 100000": (["-m", qwen_export, "--threads", "100000", "-p", "hi"], ["--threads", "100000", "per core"]),
        "video-fps 1e30": (clip + ["--video-fps", "1e30"], ["--video-fps", "at most 120"]),
        "truncated GIF video": (["-m", qwen_export, "--threads", "1", "--video", images["truncated clip"], "-p", "Go"],
                                ["--video", "cut.gif", "truncated"]),
    }


@pytest.fixture(scope="module")
def results(cases) -> dict:
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(_generate, argv) for name, (argv, _) in cases.items()}
        return {name: future.result() for name, future in futures.items()}


CASES = ["missing image", "corrupt image", "truncated jpeg", "text file as image", "folder is not a model",
         "unknown format_version", "missing graph", "corrupt graph", "max-new-tokens over context",
         "prompt over context", "top-p 1.5", "temperature -1", "top-k -2", "min-p 2", "repetition-penalty 0",
         "min-new-tokens over max", "aspect ratio over 200", "-p not UTF-8", "--system not UTF-8",
         "--dump-inputs is a file", "-p @FILE missing", "--prompt-file missing", "--prompt-file not UTF-8",
         "-m is a file", "--stop empty", "empty file as image", "-p empty", "-p blank", "-p - empty stdin",
         "--prompt-file empty", "--stop not UTF-8", "temperature 1e30", "top-k 1e20", "max-pixels 1",
         "max-pixels 1e12", "threads 100000", "video-fps 1e30", "truncated GIF video"]
# Mistakes in the command line itself (not in the files it names) exit with argparse's usage-error code.
USAGE_CASES = ["-p not UTF-8", "--system not UTF-8", "--dump-inputs is a file", "-p @FILE missing",
               "--prompt-file missing", "--prompt-file not UTF-8", "-m is a file", "--stop empty",
               "temperature -1", "top-p 1.5", "missing image", "corrupt image", "truncated jpeg", "text file as image",
               "empty file as image", "aspect ratio over 200", "-p empty", "-p blank", "-p - empty stdin",
               "--prompt-file empty", "--stop not UTF-8", "temperature 1e30", "top-k 1e20", "max-pixels 1",
               "max-pixels 1e12", "threads 100000", "video-fps 1e30", "truncated GIF video"]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_gives_one_clear_line(name, cases, results):
    proc = results[name]
    fragments = cases[name][1]
    report = f"rc={proc.returncode}\nstdout={proc.stdout!r}\nstderr={proc.stderr!r}"
    assert proc.returncode != 0, report
    assert "Traceback" not in proc.stderr, report
    assert proc.stdout == "", report
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, report
    line = lines[0]
    assert line.startswith("error: "), report
    assert len(line) < 600, report  # a message, not a dump (the long prompt must not be echoed)
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in the error line\n{report}"


@pytest.mark.parametrize("name", USAGE_CASES)
def test_command_line_mistakes_exit_2(name, results):
    assert results[name].returncode == 2, results[name].stderr


def test_cases_cover_the_list(cases):
    assert sorted(cases) == sorted(CASES)


def test_good_input_still_answers(qwen_export, photos):
    """The control: the same command line without the mistake succeeds (so the cases fail for their reason)."""
    proc = _generate(["-m", qwen_export, "--threads", "1", "--image", photos["astronaut"], "-p", "Describe the picture.",
                      "--greedy", "--max-new-tokens", "3", "--min-new-tokens", "3", "--json"])
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["token_ids"]) == 3


def test_context_error_comes_before_any_model_work(qwen_export, photos, monkeypatch, capsys):
    """An over-long request is refused before the vision graph or the decoder runs."""
    from vlm_core.runtime import generate
    from vlm_core.runtime.engine.runner import ModelRunner
    from vlm_core.runtime.model import VisionLanguageModel

    calls = []

    def forbidden(self, *args, **kwargs):
        calls.append(args)
        raise AssertionError("model work started before the context check")

    for method in ("encode_images", "prefill", "run_decoder"):
        monkeypatch.setattr(VisionLanguageModel, method, forbidden)
    for method in ("encode", "encode_images", "prefill", "run_decoder", "decode"):  # what the engine calls
        monkeypatch.setattr(ModelRunner, method, forbidden)
    rc = generate.main(["-m", qwen_export, "--threads", "1", "--image", photos["coffee"], "-p", "hi",
                        "--max-new-tokens", "100000"])
    captured = capsys.readouterr()
    assert rc != 0
    assert calls == []
    assert captured.out == ""
    assert "context" in captured.err and len(captured.err.strip().splitlines()) == 1


@pytest.mark.parametrize("flags", [["--top-p", "1.5"], ["--temperature", "-1"], ["--top-k", "-2"], ["--min-p", "2"],
                                   ["--repetition-penalty", "0"], ["--min-new-tokens", "3", "--max-new-tokens", "2"],
                                   ["--temperature", "1e30"], ["--top-k", "100000000000000000000"],
                                   ["--threads", "100000"]])
def test_bad_flags_are_refused_before_the_model_loads(flags, qwen_export, photos, monkeypatch, capsys):
    from vlm_core.runtime import generate
    from vlm_core.runtime.model import VisionLanguageModel

    def no_load(self, *args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(VisionLanguageModel, "__init__", no_load)
    rc = generate.main(["-m", qwen_export, "--image", photos["noise"], "-p", "hi", *flags])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.out == ""
    assert captured.err.startswith(f"error: {flags[0]} must be"), captured.err


@pytest.mark.parametrize("flags", [["-p", "caf\udce9"], ["-p", "hi", "--system", "\udcff"], ["-p", "hi", "--stop", ""],
                                   ["-p", "@/no/such/prompt.txt"], ["--prompt-file", "/no/such/prompt.txt"],
                                   ["-p", ""], ["-p", "hi", "--stop", "\udcff"]])
def test_bad_text_flags_are_refused_before_the_model_loads(flags, qwen_export, monkeypatch, capsys):
    from vlm_core.runtime import generate
    from vlm_core.runtime.model import VisionLanguageModel

    def no_load(self, *args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(VisionLanguageModel, "__init__", no_load)
    rc = generate.main(["-m", qwen_export, *flags])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.out == ""
    assert captured.err.startswith("error: ") and len(captured.err.strip().splitlines()) == 1, captured.err


def test_prompt_from_a_file_or_stdin_is_the_same_prompt(qwen_export, photos, tmp_path):
    """`-p @FILE`, `--prompt-file FILE` and `-p -` (stdin) give the answer `-p TEXT` gives; a prompt that
    no command line could hold (1 MB, over Linux's 128 KB limit on one argument) still reaches the model."""
    text = "Describe the picture: what is in it, which colours, and where? Über Ärger."
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(text + "\n", encoding="utf-8")  # an editor's trailing newline is dropped
    common = ["-m", qwen_export, "--threads", "1", "--image", photos["coffee"], "--greedy", "--max-new-tokens", "3",
              "--json"]
    runs = {"text": (["-p", text], None), "at-file": (["-p", f"@{prompt_file}"], None),
            "prompt-file": (["--prompt-file", str(prompt_file)], None), "stdin": (["-p", "-"], text + "\n")}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(subprocess.run, [sys.executable, "-m", "vlm_core.runtime.generate", *common, *flags],
                                     cwd=ROOT, capture_output=True, text=True, timeout=300, input=stdin,
                                     encoding="utf-8")
                   for name, (flags, stdin) in runs.items()}
        procs = {name: future.result() for name, future in futures.items()}
    outputs = {}
    for name, proc in procs.items():
        assert proc.returncode == 0, (name, proc.stderr)
        outputs[name] = json.loads(proc.stdout)
    for name, out in outputs.items():
        assert (out["prompt_tokens"], out["token_ids"]) == (outputs["text"]["prompt_tokens"],
                                                            outputs["text"]["token_ids"]), name

    huge = tmp_path / "huge.txt"
    huge.write_text("word " * 200_000, encoding="utf-8")
    proc = _generate(["-m", qwen_export, "--threads", "1", "--prompt-file", str(huge), "--max-new-tokens", "1"])
    assert proc.returncode == 2 and "context" in proc.stderr, proc.stderr  # read in full, then refused as too long


def test_prompt_argument_forms(tmp_path, monkeypatch):
    """The helper behind -p: text as is, `@FILE` read as UTF-8 (BOM and trailing newlines dropped), `@@` for
    text that starts with @."""
    import io

    from vlm_core.errors import UserError
    from vlm_core.runtime.generate import prompt_from_args

    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffline one\nline two\r\n\n".encode("utf-8"))

    def args(prompt=None, prompt_file=None):
        return type("Args", (), {"prompt": prompt, "prompt_file": prompt_file})()

    assert prompt_from_args(args("hello")) == "hello"
    assert prompt_from_args(args(f"@{path}")) == "line one\nline two"
    assert prompt_from_args(args(prompt_file=str(path))) == "line one\nline two"
    assert prompt_from_args(args("@@home")) == "@home"
    assert prompt_from_args(args("")) == ""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("from stdin\n".encode("utf-8"))))
    assert prompt_from_args(args("-")) == "from stdin"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9")))
    with pytest.raises(UserError, match="^-p -: standard input is not UTF-8 text"):
        prompt_from_args(args("-"))
    with pytest.raises(UserError, match="-p @.*is a folder"):
        prompt_from_args(args(f"@{tmp_path}"))


# Each read of a file or stream a flag names stops at a bound (a prompt: 16 MiB; a schema or grammar: 1 MiB).
UNBOUNDED = {
    "-p @/dev/zero": (["-p", "@/dev/zero"], None, ["-p @FILE", "/dev/zero", "16 MiB"]),
    "--prompt-file /dev/urandom": (["--prompt-file", "/dev/urandom"], None,
                                   ["--prompt-file", "/dev/urandom", "16 MiB"]),
    "-p - </dev/zero": (["-p", "-"], "/dev/zero", ["-p -", "standard input", "16 MiB"]),
    "--json-schema /dev/zero": (["-p", "hi", "--json-schema", "/dev/zero"], None,
                                ["--json-schema", "/dev/zero", "1 MiB"]),
    "--grammar /dev/zero": (["-p", "hi", "--grammar", "/dev/zero"], None, ["--grammar", "/dev/zero", "1 MiB"]),
}


@pytest.mark.parametrize("name", UNBOUNDED)
def test_endless_input_is_refused_at_its_size_limit(name, qwen_export):
    """Run under a 2 GiB address-space limit, so a read without a bound ends in a MemoryError (a traceback, and
    this test failing) instead of taking the machine's memory."""
    import resource

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    flags, stdin, fragments = UNBOUNDED[name]
    with open(stdin or os.devnull, "rb") as source:
        proc = subprocess.run([sys.executable, "-m", "vlm_core.runtime.generate", "-m", qwen_export, *flags], cwd=ROOT,
                              capture_output=True, text=True, timeout=300, stdin=source, preexec_fn=limit_memory,
                              env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    line = proc.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line, proc.stderr
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"


def test_a_prompt_file_just_over_the_limit_is_refused_and_one_at_it_is_read(tmp_path):
    """The bound is exact: `limit` bytes are read, `limit + 1` are refused naming the flag (a 1 MiB limit here)."""
    from vlm_core.errors import UserError
    from vlm_core.runtime.generate import read_prompt_file

    at_limit, over = tmp_path / "at.txt", tmp_path / "over.txt"
    at_limit.write_bytes(b"a" * (1 << 20))
    over.write_bytes(b"a" * ((1 << 20) + 1))
    assert len(read_prompt_file(str(at_limit), "--prompt-file", limit=1 << 20)) == 1 << 20
    with pytest.raises(UserError, match="^--prompt-file: prompt file .*over.txt' holds more than 1 MiB"):
        read_prompt_file(str(over), "--prompt-file", limit=1 << 20)


@pytest.fixture
def no_resize(monkeypatch):
    """Image resizing forbidden: a pixel budget that should be refused fails the test instead of allocating."""
    from vlm_core.models.qwen3_vl import preprocess

    def forbidden(*args, **kwargs):
        raise AssertionError("an image was resized under a pixel budget that should have been refused")

    monkeypatch.setattr(preprocess, "resize", forbidden)


def test_min_pixels_over_the_context_is_refused_before_any_resize(qwen_export, photos, no_resize, capsys):
    from vlm_core.runtime import generate

    rc = generate.main(["-m", qwen_export, "--threads", "1", "--image", photos["coffee"], "-p", "hi",
                        "--min-pixels", "1000000000000"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert captured.err.startswith("error: --min-pixels must be at most") and "context" in captured.err, captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_pixel_budget_checks_name_the_api_parameters(vlm, photos, no_resize):
    """The same bounds through the Python API name min_pixels / max_pixels (ParameterError)."""
    from vlm_core.errors import ParameterError

    messages = [{"role": "user",
                 "content": [{"type": "image", "image": photos["coffee"]}, {"type": "text", "text": "hi"}]}]
    for kwargs, name in (({"max_pixels": 1}, "max_pixels"), ({"min_pixels": 10 ** 12}, "min_pixels"),
                         ({"max_pixels": 10 ** 12}, "max_pixels"), ({"min_pixels": 2.5}, "min_pixels")):
        with pytest.raises(ParameterError, match=f"^{name} must be") as error:
            vlm.prepare(messages, **kwargs)
        assert error.value.param == name
    with pytest.raises(ParameterError, match=r"^min_pixels \(4096\) is larger than max_pixels \(2048\)"):
        vlm.prepare(messages, min_pixels=4096, max_pixels=2048)
