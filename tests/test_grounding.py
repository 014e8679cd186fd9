"""Grounding: Qwen3-VL's bbox_2d / point_2d answers parsed (fences, partial JSON) and turned from 0..1000 into pixels
of the image as the user sees it (wide, tall, EXIF-rotated, resized by max_pixels); the drawer; the CLI's
--draw-boxes and --json; GenerationResult.boxes. The random-weight model writes no boxes, so answers are given."""
from __future__ import annotations

import json
import os
from dataclasses import asdict

import pytest
from PIL import Image

from vlm_core.kernels.grounding import (
    draw_grounding,
    grounding_boxes,
    image_size_as_seen,
    label_colors,
    parse_grounding,
    to_pixels,
)
from vlm_core.kernels.image import open_image
from vlm_core.models import get_family
from vlm_core.runtime.generate import draw_answer_boxes, main
from vlm_core.runtime.output.grounding import GroundingImage
from vlm_core.runtime.output.grounding import grounded_image_index as grounded_image_at

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "grounding_cases.json"), encoding="utf-8") as f:
    CASES = json.load(f)["cases"]

RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_parses_the_shared_cases(case):
    assert [asdict(item) for item in parse_grounding(case["text"])] == case["items"]


def test_wide_image_by_hand():
    # QwenLM/Qwen3-VL's 2d_grounding cookbook: a 640x479 photo, its first box
    [box] = grounding_boxes('```json\n[{"bbox_2d": [74, 361, 324, 808], "label": "plate/dish"}]\n```', 640, 479)
    # x: 74/1000*640 = 47.36, 324/1000*640 = 207.36; y: 361/1000*479 = 172.919, 808/1000*479 = 387.032
    assert box == {"label": "plate/dish", "image": 0, "bbox": [47.36, 172.92, 207.36, 387.03], "point": None,
                   "bbox_2d": [74, 361, 324, 808], "point_2d": None, "attributes": {}}


def test_tall_image_points_clipping_and_reversed_corners_by_hand():
    text = ('[{"point_2d": [500, 250], "label": "p"}, {"bbox_2d": [100, 100, 900, 1000], "label": "b"}, '
            '{"bbox_2d": [-50, 0, 1200, 500], "label": "out"}, {"bbox_2d": [800, 600, 200, 100], "label": "rev"}]')
    boxes = grounding_boxes(text, 300, 900, image=2)  # a tall 300x900 image, the prompt's third
    assert [b["point"] for b in boxes] == [[150.0, 225.0], None, None, None]
    assert [b["bbox"] for b in boxes] == [None, [30.0, 90.0, 270.0, 900.0], [0.0, 0.0, 300.0, 450.0],
                                         [60.0, 90.0, 240.0, 540.0]]
    assert {b["image"] for b in boxes} == {2}
    assert boxes[3]["bbox_2d"] == [800, 600, 200, 100]  # as the model wrote it


def _exif_jpeg(path, orientation: int) -> str:
    """A 400x200 JPEG as stored (left half red, right half blue) with an EXIF orientation tag."""
    image = Image.new("RGB", (400, 200), BLUE)
    image.paste(RED, (0, 0, 200, 200))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif, quality=95)
    return str(path)


@pytest.mark.parametrize("orientation,seen", [(1, (400, 200)), (3, (400, 200)), (6, (200, 400)), (8, (200, 400))])
def test_size_as_seen_follows_exif_orientation(tmp_path, orientation, seen):
    path = _exif_jpeg(tmp_path / f"o{orientation}.jpg", orientation)
    assert image_size_as_seen(path) == seen == open_image(path).size  # header only, same as the full decode
    with open(path, "rb") as f:
        data = f.read()
    assert image_size_as_seen(data) == seen
    assert image_size_as_seen(Image.open(path)) == (400, 200)  # a PIL image is used as given, unrotated


def test_exif_rotated_jpeg_is_drawn_as_the_user_sees_it(tmp_path, capsys):
    # orientation 6: viewers turn the stored 400x200 picture 90 degrees clockwise -> 200x400, red on top
    path = _exif_jpeg(tmp_path / "rotated.jpg", 6)
    out = tmp_path / "boxes.png"
    answer = '```json\n[{"bbox_2d": [0, 0, 500, 250], "label": "red corner"}, {"point_2d": [500, 750]}]\n```'
    boxes = draw_answer_boxes(answer, path, str(out))
    assert boxes[0]["bbox"] == [0.0, 0.0, 100.0, 100.0]  # 500/1000*200, 250/1000*400
    assert boxes[1]["point"] == [100.0, 300.0]
    drawn = Image.open(out).convert("RGB")
    assert drawn.size == (200, 400)
    assert _near(drawn.getpixel((150, 150)), RED) and _near(drawn.getpixel((150, 380)), BLUE)  # turned as seen
    color = _rgb(label_colors(boxes)["red corner"])
    assert _near(drawn.getpixel((100, 50)), color)  # the box's right edge at x = 100
    assert _near(drawn.getpixel((50, 100)), color)  # its bottom edge at y = 100
    assert _near(drawn.getpixel((100, 300)), _rgb(label_colors(boxes)[""]))  # the point's dot
    assert capsys.readouterr().err == ""


def _rgb(hex_color: str) -> tuple:
    return tuple(int(hex_color[i:i + 2], 16) for i in (1, 3, 5))


def _near(pixel, color, tolerance=40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, color))


def test_drawer_draws_boxes_labels_and_points():
    image = Image.new("RGB", (320, 240), (255, 255, 255))
    boxes = to_pixels(parse_grounding('[{"bbox_2d": [250, 500, 750, 1000], "label": "cup"}, '
                                      '{"point_2d": [100, 100], "label": "dot"}]'), 320, 240)
    drawn = draw_grounding(image, boxes)
    assert drawn.size == image.size and image.getpixel((80, 120)) == (255, 255, 255)  # a copy
    colors = label_colors(boxes)
    cup, dot = _rgb(colors["cup"]), _rgb(colors["dot"])
    assert drawn.getpixel((80, 180)) == cup and drawn.getpixel((240, 180)) == cup  # left and right edges (x 80, 240)
    assert drawn.getpixel((160, 180)) == (255, 255, 255)  # inside stays clear
    assert drawn.getpixel((32, 24)) == dot  # the point
    tab = [drawn.getpixel((x, y)) for x in range(80, 120) for y in range(100, 119)]  # the label tab above the box
    assert tab.count(cup) > 100 and (255, 255, 255) in tab  # coloured tab with white text


def test_answer_without_boxes_writes_nothing_and_says_so(tmp_path, capsys):
    path = _exif_jpeg(tmp_path / "plain.jpg", 1)
    out = tmp_path / "boxes.png"
    assert draw_answer_boxes("There is no cup in this picture.", path, str(out)) == []
    assert not out.exists()
    assert "no boxes or points" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    ([], "--draw-boxes needs an image"),
    (["--image", "IMG", "--draw-boxes", "out.unknownext"], "extension"),
    (["--image", "IMG", "--draw-boxes", "TMP"], "is a folder"),
    (["--image", "IMG", "--draw-boxes", "TMP/missing/out.png"], "does not exist"),
])
def test_cli_refuses_draw_boxes_it_cannot_write(tmp_path, capsys, extra, message):
    image = _exif_jpeg(tmp_path / "a.jpg", 1)
    argv = ["-m", str(tmp_path / "no-model"), "-p", "Locate the cup."]
    argv += [a.replace("IMG", image).replace("TMP", str(tmp_path)) for a in extra] or ["--draw-boxes", "out.png"]
    assert main(argv) == 2  # refused before any model is loaded
    err = capsys.readouterr().err
    assert err.startswith("error: --draw-boxes") and message in err, err


def test_cli_refuses_draw_boxes_for_a_family_without_grounding(tmp_path, capsys, monkeypatch):
    class MiniGPT4Model:  # what the CLI reads of a loaded MiniGPT-4 export
        def __init__(self, folder, threads=None, **options):
            self.family, self.manifest = get_family("minigpt4").Family, {"family": "minigpt4"}

    monkeypatch.setattr("vlm_core.runtime.model.VisionLanguageModel", MiniGPT4Model)
    image = _exif_jpeg(tmp_path / "a.jpg", 1)
    out = str(tmp_path / "o.png")
    assert main(["-m", str(tmp_path), "--image", image, "-p", "Locate it.", "--draw-boxes", out]) == 2
    assert "--draw-boxes: minigpt4 models write no boxes" in capsys.readouterr().err


def test_grounded_image_is_the_first_of_the_last_user_turn_with_images():
    from vlm_core.runtime.chat.messages import normalize_messages

    def grounded_image_index(messages):  # of the messages as the facade has them: normalised once
        return grounded_image_at(normalize_messages(messages)[0])

    image = {"type": "image", "image": "x.png"}
    text = {"type": "text", "text": "Locate it."}
    one_turn = [{"role": "user", "content": [image, dict(image), text]}]
    assert grounded_image_index(one_turn) == 0
    follow_up = one_turn + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "And the cup?"}]
    assert grounded_image_index(follow_up) == 0  # no new picture: the latest one before it
    new_picture = follow_up + [{"role": "assistant", "content": [image]},  # an image outside user turns counts
                               {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "y.png"}}]}]
    assert grounded_image_index(new_picture) == 3  # images 0, 1 (user), 2 (assistant), 3 (user)
    assert grounded_image_index([{"role": "user", "content": "Hi"}]) is None


def test_minigpt4_family_writes_no_boxes():
    assert get_family("minigpt4").Family.grounding_scale is None  # the contract's default: no boxes
    assert get_family("qwen3_vl").Family.grounding_scale == 1000


# --- through the model (the tiny random-weight export) ----------------------------------------------------------

class _Answer:
    """A finished Sequence stand-in holding a given answer (the random-weight model writes no boxes)."""

    def __init__(self, prompt, text: str):
        from vlm_core.runtime.engine.sequence import GenerationChunk

        self.prompt, self.timings, self.cached_tokens, self.logprobs = prompt, {}, 0, None
        self._chunks = [GenerationChunk(text, 1), GenerationChunk("", 2, "stop")]

    def chunks(self):
        return iter(self._chunks)


ANSWER = '```json\n[{"bbox_2d": [250, 0, 750, 500], "label": "cup"}, {"point_2d": [500, 900], "label": "spoon"}]\n```'


def _messages(*turns):
    return [{"role": role, "content": [*({"type": "image", "image": i} for i in images), {"type": "text", "text": t}]}
            for role, images, t in turns]


def test_result_boxes_are_in_pixels_of_the_picture_sent_whatever_max_pixels(vlm, tmp_path):
    wide = tmp_path / "wide.png"
    Image.new("RGB", (640, 200), (9, 9, 9)).save(wide)
    rotated = _exif_jpeg(tmp_path / "rotated.jpg", 6)  # seen as 200x400
    messages = _messages(("user", [str(wide)], "Describe."), ("assistant", [], "A dark picture."),
                         ("user", [rotated], "Locate the cup."))
    grids, results = [], []
    for max_pixels in (None, 64 * 64):  # the model sees the second image smaller: relative values do not change
        prompt = vlm.prepare(messages, max_pixels=max_pixels)
        assert prompt.grounding_image == GroundingImage(1, 200, 400)
        grids.append(prompt.media_grid[1].tolist())
        results.append(vlm._result(_Answer(prompt, ANSWER)))
    assert grids[0] != grids[1]
    assert results[0].boxes == results[1].boxes
    cup, spoon = results[0].boxes
    assert (cup["label"], cup["image"], cup["bbox"]) == ("cup", 1, [50.0, 0.0, 150.0, 200.0])
    assert spoon["point"] == [100.0, 360.0]
    assert results[0].to_dict()["boxes"] == results[0].boxes
    assert vlm.generate(_messages(("user", [], "Hi")), max_new_tokens=2).boxes == []  # no image, no boxes


def test_cli_draw_boxes_and_json(qwen_export, tmp_path, capsys, monkeypatch):
    from vlm_core.runtime.engine.sequence import GenerationChunk
    from vlm_core.runtime.model import VisionLanguageModel

    image = _exif_jpeg(tmp_path / "rotated.jpg", 6)
    out = tmp_path / "boxes.png"
    argv = ["-m", qwen_export, "--image", image, "-p", "Locate the cup.", "--greedy", "--max-new-tokens", "3",
            "--threads", "1", "--draw-boxes", str(out), "--json"]
    # the random-weight model's own answer holds no boxes: nothing is written, stderr says so, exit status 0
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["boxes"] == [] and not out.exists()
    assert "no boxes or points" in captured.err

    def answer(self, *args, **kwargs):  # the same run with a known answer
        yield GenerationChunk(ANSWER, 1)
        yield GenerationChunk("", 2, "stop")

    monkeypatch.setattr(VisionLanguageModel, "stream_generate", answer)
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert [b["bbox"] for b in result["boxes"]] == [[50.0, 0.0, 150.0, 200.0], None]
    assert Image.open(out).size == (200, 400)
    assert main(argv[:-3] + ["--json"]) == 0  # --json alone reports the boxes too
    assert json.loads(capsys.readouterr().out)["boxes"] == result["boxes"]
