"""The chat page draws an answer's boxes and points over the image it sent, in a real (headless) browser.

The random-weight model writes no boxes, so the page is served with its own files and a fake server (Playwright
routes): /health, /v1/models, and a /v1/chat/completions stream holding a known answer. Also checks that the page's
parser (runtime/server/static/grounding.js) reads tests/grounding_cases.json as kernels/grounding.py does, and that its
pixel boxes equal Python's for an EXIF-rotated photo. VLM_UPDATE_SCREENSHOT=1 refreshes docs/grounding-screenshot.png.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
from PIL import Image

from vlm_core.kernels.grounding import (
    grounding_boxes,
    image_size_as_seen,
    parse_grounding,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATIC = os.path.join(ROOT, "vlm_core", "runtime", "server", "static")
CHROMIUM = "/usr/bin/chromium"
BASE = "http://grounding.test"
with open(os.path.join(ROOT, "tests", "grounding_cases.json"), encoding="utf-8") as f:
    CASES = json.load(f)["cases"]

# A hand-written answer for assets/astronaut.jpg (320x320) in Qwen3-VL's format, streamed in small pieces.
ANSWER = """```json
[
  {"bbox_2d": [345, 120, 535, 330], "label": "face"},
  {"bbox_2d": [545, 665, 975, 1000], "label": "helmet"},
  {"bbox_2d": [690, 0, 915, 560], "label": "space shuttle"},
  {"bbox_2d": [0, 0, 185, 690], "label": "flag"},
  {"point_2d": [335, 750], "label": "mission patch"},
  {"point_2d": [590, 700], "label": "name tag"}
]
```"""


def _sse(answer: str) -> str:
    pieces = [answer[i:i + 7] for i in range(0, len(answer), 7)]
    events = [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    events.append({"choices": [], "usage": {"prompt_tokens": 90, "completion_tokens": len(pieces), "total_tokens": 0}})
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


class FakeServer:
    """Playwright route handler: the page's own files, and a model that always gives `self.answer`."""

    TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}

    def __init__(self, answer: str):
        self.answer, self.requests = answer, []

    def __call__(self, route):
        path = route.request.url[len(BASE):].split("?")[0]
        if path == "/":
            path = "/static/index.html"
        if path.startswith("/static/"):
            name = os.path.join(STATIC, os.path.basename(path))
            with open(name, "rb") as f:
                return route.fulfill(status=200, body=f.read(), content_type=self.TYPES[os.path.splitext(name)[1]])
        if path == "/health":
            return route.fulfill(status=200, json={"status": "ok", "model": "qwen3-vl-fake", "auth": False})
        if path == "/v1/models":
            return route.fulfill(status=200, json={"object": "list", "data": [{"id": "qwen3-vl-fake"}]})
        if path == "/v1/chat/completions":
            self.requests.append(json.loads(route.request.post_data))
            return route.fulfill(status=200, body=_sse(self.answer), content_type="text/event-stream")
        return route.fulfill(status=404, body="not found")


def _exif_rotated_jpeg(path) -> str:
    """Stored 400x200 with EXIF orientation 6: browsers and kernels/image.py show it 200x400."""
    image = Image.new("RGB", (400, 200), (40, 90, 200))
    image.paste((230, 60, 40), (0, 0, 200, 200))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif, quality=95)
    return str(path)


def _ask(page, image: str, prompt: str, answers_before: int) -> None:
    page.set_input_files("#file", image)
    page.wait_for_selector("#attachments img")
    page.fill("#prompt", prompt)
    page.click("#send")
    page.wait_for_function(f"document.querySelectorAll('.assistant .stats[data-finish]').length > {answers_before}")
    page.wait_for_function(f"document.querySelectorAll('.grounding[data-size]').length > {answers_before}")


def _marks(page, index: int) -> list:
    """Each box/point of the index-th answer figure: class, label, data-px, and its rectangle relative to the image."""
    return page.evaluate("""(index) => {
        const figure = document.querySelectorAll('.grounding')[index];
        const img = figure.querySelector('img').getBoundingClientRect();
        return [...figure.querySelectorAll('.gbox, .gpoint')].map((el) => {
            const r = el.getBoundingClientRect();
            return {kind: el.className.split(' ')[0], label: el.textContent, px: el.dataset.px.split(',').map(Number),
                    visible: r.width > 0, left: (r.left - img.left) / img.width, top: (r.top - img.top) / img.height,
                    right: (r.right - img.left) / img.width, bottom: (r.bottom - img.top) / img.height,
                    cx: (r.left + r.width / 2 - img.left) / img.width,
                    cy: (r.top + r.height / 2 - img.top) / img.height,
                    width: img.width, height: img.height};
        });
    }""", index)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (apt-get install chromium)")
def test_page_draws_boxes_and_points_over_the_image_sent(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is a test dependency")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]
    astronaut = os.path.join(ROOT, "assets", "astronaut.jpg")
    rotated = _exif_rotated_jpeg(tmp_path / "rotated.jpg")
    server = FakeServer(ANSWER)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 1000})
            page.route(BASE + "/**", server)
            page.goto(BASE + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('qwen3-vl-fake')")

            # the page's parser finds what kernels/grounding.py finds, in every shared case
            found = page.evaluate("(texts) => texts.map((t) => parseGrounding(t))", [c["text"] for c in CASES])
            assert found == [c["items"] for c in CASES]

            _ask(page, astronaut, "Locate the face, helmet, shuttle and flag; point to the patch and name tag.", 0)
            assert server.requests[0]["messages"][0]["content"][0]["type"] == "image_url"
            marks = _marks(page, 0)
            assert [(m["kind"], m["label"]) for m in marks] == [
                ("gbox", "face"), ("gbox", "helmet"), ("gbox", "space shuttle"), ("gbox", "flag"),
                ("gpoint", "mission patch"), ("gpoint", "name tag")]
            # pixel coordinates on the 320x320 photo sent: those of kernels/grounding.py
            expected = grounding_boxes(ANSWER, *image_size_as_seen(astronaut))
            assert [m["px"] for m in marks] == [b["bbox"] or b["point"] for b in expected]
            # drawn where the relative coordinates say, over the displayed image (1.5 px of slack)
            tolerance = 1.5 / marks[0]["width"]
            for mark, item in zip(marks, parse_grounding(ANSWER)):
                if item.bbox_2d:
                    want = [v / 1000 for v in item.bbox_2d]
                    got = [mark["left"], mark["top"], mark["right"], mark["bottom"]]
                else:
                    want, got = [v / 1000 for v in item.point_2d], [mark["cx"], mark["cy"]]
                assert all(abs(g - w) <= tolerance for g, w in zip(got, want)), (mark["label"], got, want)
            assert "4 boxes and 2 points" in page.text_content(".grounding figcaption")

            shot = tmp_path / "grounding-screenshot.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 1000
            if os.environ.get("VLM_UPDATE_SCREENSHOT"):  # refresh the README's picture on request only
                shutil.copy(shot, os.path.join(ROOT, "docs", "grounding-screenshot.png"))

            # the checkbox hides and shows them
            page.click(".grounding .grounding-toggle")
            assert not any(m["visible"] for m in _marks(page, 0))
            page.click(".grounding .grounding-toggle")
            assert all(m["visible"] for m in _marks(page, 0))

            # an EXIF-rotated photo: the browser shows it turned, as kernels/image.py loads it; same pixels
            server.answer = ('[{"bbox_2d": [0, 0, 500, 250], "label": "red corner"}, '
                             '{"point_2d": [500, 750], "label": "p"}]')
            _ask(page, rotated, "Locate the red corner.", 1)
            sizes = page.evaluate("[...document.querySelectorAll('.grounding')].map((f) => f.dataset.size)")
            assert sizes == ["320x320", "200x400"]
            assert image_size_as_seen(rotated) == (200, 400)
            assert [m["px"] for m in _marks(page, 1)] == [[0, 0, 100, 100], [100, 300]]
            assert [b["bbox"] or b["point"] for b in grounding_boxes(server.answer, 200, 400)] == [[0, 0, 100, 100],
                                                                                                    [100, 300]]
        finally:
            browser.close()
