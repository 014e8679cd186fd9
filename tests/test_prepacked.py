"""Pre-packed 4-bit weights: written once under the folder, loaded memory-mapped, the same logits."""
import logging
import os
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from vlm_core.runtime.engine import prepacked
from vlm_core.runtime.model import VisionLanguageModel

MESSAGES = [{"role": "user", "content": [{"type": "text", "text": "Describe the weather in three words."}]}]


@pytest.fixture
def int4_copy(qwen_export_int4, tmp_path) -> str:
    """A private copy of the tiny int4 export (these tests write under it), without the pre-packed copy an
    earlier test's load of the shared export may have written."""
    folder = str(tmp_path / "int4")
    shutil.copytree(qwen_export_int4, folder, ignore=shutil.ignore_patterns(prepacked.FOLDER))
    return folder


@pytest.fixture
def loaded_paths(monkeypatch) -> list:
    """The graph paths ONNX Runtime sessions are built from during the test."""
    paths, real = [], ort.InferenceSession

    def recording(path, *args, **kwargs):
        paths.append(os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    return paths


def _logits(vlm) -> np.ndarray:
    return vlm.prefill(vlm.prepare(MESSAGES))


def _packed_weight_bytes(path: str) -> int:
    """Bytes of the 4-bit weights (MatMulNBits' B inputs) in the graph at `path`."""
    import onnx

    model = onnx.load(path)
    weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMulNBits"}
    return sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer if t.name in weights)


def test_packed_copy_written_once_then_loaded(int4_copy, loaded_paths):
    graph = VisionLanguageModel(int4_copy, threads=1, prepacked_cache=False).manifest["graphs"]["decoder"]
    stale = os.path.join(int4_copy, prepacked.FOLDER, "decoder.int4-0123456789abcdef")
    os.makedirs(stale)  # a copy for another ONNX Runtime or CPU: removed once this host's is written
    abandoned = os.path.join(int4_copy, prepacked.FOLDER, prepacked.WORK_PREFIX + "dead")
    writing = os.path.join(int4_copy, prepacked.FOLDER, prepacked.WORK_PREFIX + "live")
    os.makedirs(abandoned)
    os.makedirs(writing)  # another process writing now: kept
    os.utime(abandoned, (0, 0))
    del loaded_paths[:]
    VisionLanguageModel(int4_copy, threads=1)
    target = prepacked.packed_path(int4_copy, graph)
    source = os.path.join(int4_copy, graph["file"])
    # built from the source (writing the copy), then from the copy; the vision graph from its own file
    assert [p for p in loaded_paths if "decoder" in p] == [source, target]
    # the packed blobs are in the copy's external data: at least the source's 4-bit weights' bytes
    assert os.path.getsize(target + prepacked.DATA_SUFFIX) >= _packed_weight_bytes(source) > 0
    assert not os.path.exists(stale) and not os.path.exists(abandoned)
    assert sorted(os.listdir(os.path.dirname(os.path.dirname(target)))) == sorted(
        [os.path.basename(os.path.dirname(target)), os.path.basename(writing)])  # and no work folder of ours
    written = os.stat(target + prepacked.DATA_SUFFIX).st_mtime_ns
    del loaded_paths[:]
    VisionLanguageModel(int4_copy, threads=1)
    assert [p for p in loaded_paths if "decoder" in p] == [target]  # reused, not written again
    assert os.stat(target + prepacked.DATA_SUFFIX).st_mtime_ns == written


def test_logits_equal_packing_in_memory(int4_copy):
    # Exactly equal, not to a tolerance: the packed copy holds the bytes MLAS's PrePack made, and the same
    # kernels read them; only where they live differs (a mapped file instead of the heap).
    mapped = VisionLanguageModel(int4_copy, threads=1)
    assert os.path.isdir(os.path.join(int4_copy, prepacked.FOLDER))
    in_memory = VisionLanguageModel(int4_copy, threads=1, prepacked_cache=False)
    expected = _logits(in_memory)
    np.testing.assert_array_equal(_logits(mapped), expected)
    # and a copy that was already on disk (a second load) gives them too
    np.testing.assert_array_equal(_logits(VisionLanguageModel(int4_copy, threads=1)), expected)


def test_unwritable_folder_packs_in_memory_with_a_note(int4_copy, monkeypatch, caplog):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", args[0] if args else None)

    # root ignores a read-only mode bit, so the refusal is what a read-only folder gives an unprivileged user
    monkeypatch.setattr(prepacked.os, "makedirs", refuse)
    with caplog.at_level(logging.WARNING, logger="vlm_core.runtime"):
        vlm = VisionLanguageModel(int4_copy, threads=1)
    notes = [r.getMessage() for r in caplog.records if "pre-packed weights not cached" in r.getMessage()]
    assert len(notes) == 1 and "Permission denied" in notes[0] and "\n" not in notes[0]
    assert not os.path.exists(os.path.join(int4_copy, prepacked.FOLDER))
    monkeypatch.undo()
    np.testing.assert_array_equal(_logits(vlm),
                                  _logits(VisionLanguageModel(int4_copy, threads=1, prepacked_cache=False)))


def test_key_follows_the_source_and_the_runtime(int4_copy, monkeypatch):
    graph = {"file": "decoder.int4.onnx"}
    before = prepacked.cache_key(int4_copy, graph)
    monkeypatch.setattr(ort, "__version__", ort.__version__ + ".other")
    assert prepacked.cache_key(int4_copy, graph) != before
    monkeypatch.undo()
    os.utime(os.path.join(int4_copy, graph["file"]), ns=(0, 0))  # a re-export rewrites the file
    assert prepacked.cache_key(int4_copy, graph) != before
