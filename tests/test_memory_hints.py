"""Memory hints: vision weights marked cold after each vision call, freed heap returned (Linux)."""
import os
import sys

import numpy as np
import pytest

from vlm_core.runtime.engine import memory_hints

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise/malloc_trim hints are Linux-only")


@linux
def test_mark_cold_advises_exactly_the_mapped_file(tmp_path):
    path = str(tmp_path / "weights.bin")
    np.arange(1 << 20, dtype=np.float32).tofile(path)  # 4 MiB
    other = str(tmp_path / "other.bin")
    np.zeros(1 << 16, dtype=np.float32).tofile(other)
    mapped = np.memmap(path, dtype=np.float32, mode="r")
    kept = np.memmap(other, dtype=np.float32, mode="r")
    assert float(mapped[12345]) == 12345.0 and float(kept[0]) == 0.0
    real = os.path.realpath(path)
    assert memory_hints.mapped_ranges({real})  # found in /proc/self/maps
    assert memory_hints.mark_cold({real}) >= 4 << 20
    assert memory_hints.mark_cold(set()) == 0
    # the contents are untouched: cold pages are only the first to go when memory runs short
    np.testing.assert_array_equal(mapped[:8], np.arange(8, dtype=np.float32))
    memory_hints.release_freed_heap()
    del mapped, kept


def test_graph_files_are_the_graph_and_its_external_data(tmp_path):
    graph = {"file": "vision.int8.onnx", "external_data": ["vision.int8.onnx.data"]}
    assert memory_hints.graph_files(str(tmp_path), graph) == {
        os.path.realpath(str(tmp_path / "vision.int8.onnx")), os.path.realpath(str(tmp_path / "vision.int8.onnx.data"))}


def test_each_vision_call_is_followed_by_the_hints(vlm, tmp_path, monkeypatch):
    from PIL import Image

    from vlm_core import SamplingParams

    calls = []
    monkeypatch.setattr(memory_hints, "after_vision", lambda files: calls.append(files))
    # images of this test's own: the session model's image-feature cache may hold any shared photo already
    rng = np.random.default_rng(20261207)
    paths = []
    for index, size in enumerate(((61, 83), (90, 47))):
        paths.append(str(tmp_path / f"image{index}.png"))
        Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8")).save(paths[-1])
    messages = [{"role": "user", "content": [{"type": "image", "path": paths[0]}, {"type": "image", "path": paths[1]},
                                             {"type": "text", "text": "Compare."}]}]
    vlm.generate(messages, SamplingParams(greedy=True), max_new_tokens=2)
    vision = vlm.manifest["graphs"]["vision"]
    assert calls == [memory_hints.graph_files(vlm.folder, vision)] * 2  # one per image
