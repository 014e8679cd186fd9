"""`python -m vlm_core.export SRC -o OUT`: refuses to clobber, replaces only with --force, rejects what is not a
checkpoint with one line, and never leaves OUT (or a staging folder) behind when an export fails.

No extra full export: the two slow graph exports (torch.onnx, ~20 s) are stubbed with copies of the
session's already-exported graphs of the same checkpoint, so loading, the eager reference, the assets,
the manifest, the parity check and the atomic publish all run for real.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leftovers(out: str) -> list[str]:
    """Staging (`.OUT.partial-*`) and swap (`OUT.old-*`) folders the export may have left beside OUT."""
    parent, name = os.path.split(os.path.abspath(out))
    if not os.path.isdir(parent):
        return []
    return sorted(e for e in os.listdir(parent) if e.startswith(f".{name}.partial-") or e.startswith(f"{name}.old-"))


def _snapshot(folder: str) -> dict:
    """relative path -> bytes, for every file under `folder`."""
    found = {}
    for dirpath, _, files in os.walk(folder):
        for file in files:
            path = os.path.join(dirpath, file)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


def _occupied(folder) -> str:
    folder = str(folder)
    os.makedirs(os.path.join(folder, "notes"))
    with open(os.path.join(folder, "keep.txt"), "w") as f:
        f.write("user data that must survive\n")
    with open(os.path.join(folder, "notes", "a.md"), "w") as f:
        f.write("# more\n")
    return folder


def _quiet():
    from vlm_core.export.pipeline import Progress

    return Progress(total=6, stream=io.StringIO(), heartbeat_s=600)


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.fixture
def copied_graphs(monkeypatch, qwen_export):
    """Stub export_vision / export_decoder with copies of the session export's graphs (same checkpoint)."""
    import vlm_core.export.qwen3_vl as family

    with open(os.path.join(qwen_export, "manifest.json"), encoding="utf-8") as f:
        graphs = json.load(f)["graphs"]
    calls = []

    def copier(name):
        def export(*args, **kwargs):
            path = next(a for a in list(args) + list(kwargs.values()) if isinstance(a, str) and a.endswith(".onnx"))
            calls.append((name, path))
            shutil.copyfile(os.path.join(qwen_export, graphs[name]["file"]), path)
            for extra in graphs[name].get("external_data", []):
                shutil.copyfile(os.path.join(qwen_export, extra), os.path.join(os.path.dirname(path), extra))
            return list(graphs[name].get("external_data", []))
        return export

    monkeypatch.setattr(family, "export_vision", copier("vision"))
    monkeypatch.setattr(family, "export_decoder", copier("decoder"))
    return calls


# --- the output folder ---------------------------------------------------------------------------

def test_nonempty_out_is_refused_without_force(qwen_checkpoint, tmp_path):
    out = _occupied(tmp_path / "model")
    before = _snapshot(out)
    proc = subprocess.run([sys.executable, "-m", "vlm_core.export", qwen_checkpoint, "-o", out], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "not empty" in lines[0] and "--force" in lines[0], lines[0]
    assert out in lines[0]
    assert _snapshot(out) == before
    assert _leftovers(out) == []


def test_force_replaces_a_nonempty_out(qwen_checkpoint, tmp_path, capsys, copied_graphs):
    from vlm_core.export.cli import main
    from vlm_core.runtime.manifest import list_files, load_manifest
    from vlm_core.runtime.model import VisionLanguageModel

    out = _occupied(tmp_path / "model")
    assert main([qwen_checkpoint, "-o", out, "--force", "--parity-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert _error_lines(err) == []
    assert [name for name, _ in copied_graphs] == ["vision", "decoder"]
    manifest = load_manifest(out)
    assert manifest["parity"]["greedy_tokens"] == 2  # --parity-tokens reached the check (main() == 0: it passed)
    assert not os.path.exists(os.path.join(out, "keep.txt")) and not os.path.exists(os.path.join(out, "notes"))
    assert sorted(os.listdir(out)) == sorted(set(list_files(manifest)) | {"manifest.json"})
    assert _leftovers(out) == []
    model = VisionLanguageModel(out, threads=1)
    assert len(model.generate([{"role": "user", "content": "Hi"}], max_new_tokens=2, min_new_tokens=2).token_ids) == 2


# --- what is not a checkpoint --------------------------------------------------------------------

def _write_config(folder, content) -> str:
    folder = str(folder)
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))
    return folder


@pytest.mark.parametrize("kind, fragments", [
    ("no config.json", ["config.json"]),
    ("unsupported model_type", ["llava_next", "not supported", "qwen3_vl"]),
    ("config.json not JSON", ["config.json", "JSON"]),
    ("config.json not an object", ["config.json", "JSON object"]),
])
def test_source_that_is_not_a_checkpoint(kind, fragments, tmp_path, capsys):
    from vlm_core.export.cli import main

    source = str(tmp_path / "src")
    if kind == "no config.json":
        os.makedirs(source)
        with open(os.path.join(source, "model.safetensors"), "wb") as f:
            f.write(b"\0" * 8)
    elif kind == "unsupported model_type":
        _write_config(source, {"model_type": "llava_next", "architectures": ["LlavaNextForConditionalGeneration"]})
    elif kind == "config.json not JSON":
        _write_config(source, "{model_type: qwen3_vl")
    else:
        _write_config(source, ["qwen3_vl"])
    out = str(tmp_path / "out")
    rc = main([source, "-o", out])
    captured = capsys.readouterr()
    assert rc != 0
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and source in lines[0], lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not os.path.exists(out)
    assert _leftovers(out) == []
    assert sorted(os.listdir(tmp_path)) == ["src"]


# --- failures during the export ------------------------------------------------------------------

@pytest.mark.parametrize("existing_out", [False, True], ids=["fresh OUT", "--force over an old OUT"])
def test_failure_in_the_middle_leaves_nothing(existing_out, qwen_checkpoint, tmp_path, monkeypatch, copied_graphs):
    import vlm_core.export.qwen3_vl as family
    from vlm_core.export.pipeline import run_export

    out = str(tmp_path / "model")
    before = _snapshot(_occupied(out)) if existing_out else None
    seen = {}

    def broken_decoder(model, path, *args, **kwargs):
        staging = os.path.dirname(path)
        seen["staging"], seen["files"] = staging, sorted(os.listdir(staging))
        raise RuntimeError("simulated crash while exporting the decoder")

    monkeypatch.setattr(family, "export_decoder", broken_decoder)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_export(qwen_checkpoint, out, force=existing_out, progress=_quiet(), parity_tokens=2)
    # The failure really happened mid-way: a staging folder beside OUT already held the vision graph.
    assert os.path.basename(seen["staging"]).startswith(".model.partial-")
    assert "vision.onnx" in seen["files"]
    assert not os.path.exists(seen["staging"])
    assert _leftovers(out) == []
    if existing_out:
        assert _snapshot(out) == before
    else:
        assert not os.path.exists(out)
        assert os.listdir(tmp_path) == []


def test_parity_failure_raises_and_publishes_nothing(qwen_checkpoint, tmp_path, monkeypatch, copied_graphs):
    import vlm_core.export.qwen3_vl as family
    from vlm_core.export.pipeline import ExportError, run_export

    real_reference = family.reference_case

    def wrong_reference(*args, **kwargs):
        reference = real_reference(*args, **kwargs)
        reference["tokens"] = [(t + 1) % 1000 for t in reference["tokens"]]  # tokens the graphs will not produce
        return reference

    monkeypatch.setattr(family, "reference_case", wrong_reference)
    out = str(tmp_path / "model")
    with pytest.raises(ExportError, match="do not match") as info:
        run_export(qwen_checkpoint, out, progress=_quiet(), parity_tokens=2)
    assert "\n" not in str(info.value)
    figures = json.loads(str(info.value).split(": ", 1)[1])
    # the message names the failure (raised only when "passed" is false): the tokens, not the logits
    assert figures["greedy_tokens_equal"] is False and figures["first_logits_rel_err"] <= 1e-4
    assert [name for name, _ in copied_graphs] == ["vision", "decoder"]
    assert not os.path.exists(out)
    assert _leftovers(out) == []
    assert os.listdir(tmp_path) == []


def test_parity_failure_through_the_cli_is_one_line(qwen_checkpoint, tmp_path, monkeypatch, copied_graphs, capsys):
    import vlm_core.export.parity
    from vlm_core.export.cli import main

    def failing(folder, reference, **kwargs):
        assert os.path.isfile(os.path.join(folder, "manifest.json"))
        return {"first_logits_rel_err": 0.5, "greedy_tokens_equal": False, "passed": False}

    import vlm_core.export.qwen3_vl as family

    monkeypatch.setattr(vlm_core.export.parity, "check_parity", failing)
    monkeypatch.setattr(family, "reference_case", lambda *args, **kwargs: {})  # unused by the stub above
    out = str(tmp_path / "model")
    assert main([qwen_checkpoint, "-o", out, "--parity-tokens", "2"]) == 1
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "do not match eager PyTorch" in errors[0], errors
    assert "Traceback" not in errors[0]
    assert not os.path.exists(out)
    assert _leftovers(out) == []
