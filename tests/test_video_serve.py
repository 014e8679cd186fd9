"""Video input through the CLI (`--video`, mixed with `--image` in command-line order, the `--video-*` budget) and
the server (`video_url` parts and transformers' `{"type": "video", "video": URL}`, the `video_*` request fields,
`--allow-remote-media`), and the chat page's video button: answers equal the Python API's on the same messages;
bad videos are one `error:` line and exit 2, or a 400 naming the field, and the server keeps serving.

The clip is written here with PyAV: six 64x48 frames panned across a photograph (scikit-image's astronaut)."""
from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import sys
import threading
from fractions import Fraction

import numpy as np
import pytest

av = pytest.importorskip("av", reason="PyAV is in the test extra (pip install 'vlm-core[test]')")

from test_serve import CHROMIUM, Server, chromium_page, open_greedy_page  # noqa: E402

from vlm_core.kernels.sampling import SamplingParams  # noqa: E402
from vlm_core.models.media import VideoOptions  # noqa: E402
from vlm_core.runtime import generate as cli  # noqa: E402

N_TOKENS = 6
PROMPT = "Describe."
GREEDY = SamplingParams(greedy=True)


def write_clip(path: str, n_frames: int = 6, fps: int = 4, width: int = 64, height: int = 48) -> str:
    """An MPEG-4 clip of `n_frames` crops panning across the astronaut photograph."""
    from PIL import Image
    from skimage import data

    photo = np.asarray(Image.fromarray(data.astronaut()).resize((width * 2, height * 2)))
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n_frames):
            frame = np.ascontiguousarray(photo[i * 4:i * 4 + height, i * 6:i * 6 + width])
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    return write_clip(str(tmp_path_factory.mktemp("video") / "pan.mp4"))


def video_data_url(path: str) -> str:
    with open(path, "rb") as f:
        return "data:video/mp4;base64," + base64.b64encode(f.read()).decode()


def video_messages(part: dict, text: str = PROMPT) -> list:
    return [{"role": "user", "content": [part, {"type": "text", "text": text}]}]


# --- CLI -------------------------------------------------------------------------------------------------

def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def media_kinds(input_ids, family) -> list:
    """The prompt's media in order: 'image' / 'video' per run of pad tokens, consecutive runs of a kind merged
    (a clip's frame groups are several runs)."""
    kinds = {family.image_token_id: "image", family.video_token_id: "video"}
    order = [kinds[t] for t in np.asarray(input_ids).reshape(-1).tolist() if t in kinds]
    return [kind for i, kind in enumerate(order) if i == 0 or order[i - 1] != kind]


def test_cli_image_video_image_in_order_equals_the_api(qwen_export, vlm, photos, clip, tmp_path, capsys):
    dump = str(tmp_path / "inputs")
    code, out, err = run_cli(capsys, "-m", qwen_export, "--image", photos["astronaut"], "--video", clip,
                             "--image", photos["coffee"], "-p", PROMPT, "--greedy", "--max-new-tokens", str(N_TOKENS),
                             "--threads", "1", "--json", "--dump-inputs", dump, "--video-max-frames", "4")
    assert code == 0, err
    answer = json.loads(out)
    messages = [{"role": "user", "content": [{"type": "image", "image": photos["astronaut"]},
                                             {"type": "video", "video": clip},
                                             {"type": "image", "image": photos["coffee"]},
                                             {"type": "text", "text": PROMPT}]}]
    prompt = vlm.prepare(messages, video=VideoOptions(max_frames=4), max_new_tokens=N_TOKENS)
    input_ids = np.load(os.path.join(dump, "input_ids.npy")).reshape(-1)
    np.testing.assert_array_equal(input_ids, prompt.input_ids)
    assert media_kinds(input_ids, vlm.family) == ["image", "video", "image"]
    assert np.load(os.path.join(dump, "video_grid_thw.npy")).shape == (1, 3)
    assert np.load(os.path.join(dump, "image_grid_thw.npy")).shape == (2, 3)
    expected = vlm.generate(messages, GREEDY, max_new_tokens=N_TOKENS, video={"max_frames": 4})
    assert answer["token_ids"] == expected.token_ids and answer["text"] == expected.text
    assert answer["prompt_tokens"] == len(prompt.input_ids)


@pytest.fixture(scope="module")
def bad_videos(clip, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("bad-videos")
    with open(clip, "rb") as f:
        data = f.read()
    paths = {"text": folder / "notes.mp4", "truncated": folder / "cut.mp4", "empty folder": folder / "frames",
             "huge": folder / "huge.gif"}
    paths["text"].write_text("this is not a video\n")
    paths["truncated"].write_bytes(data[: len(data) // 3])
    paths["empty folder"].mkdir()
    paths["huge"].write_bytes(huge_gif())
    return {name: str(path) for name, path in paths.items()}


def huge_gif() -> bytes:
    """A small animated GIF whose header says 9000x9000 (81 M pixels): refused from the header, nothing decoded."""
    import io
    import struct

    from PIL import Image

    frames = [Image.new("RGB", (64, 48), (60 * i, 90, 30)) for i in range(3)]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100)
    data = bytearray(out.getvalue())
    data[6:10] = struct.pack("<HH", 9000, 9000)  # the logical screen size
    return bytes(data)


@pytest.mark.parametrize("case, flags, says", [
    ("missing", ["--video", "{missing}"], "no such file or folder"),
    ("not a video", ["--video", "{text}"], "not a video file"),
    ("truncated", ["--video", "{truncated}"], "truncated"),
    ("zero frames", ["--video", "{empty folder}"], "zero frames"),
    ("huge resolution", ["--video", "{huge}"], "9000x9000"),
    ("fps zero", ["--video", "{clip}", "--video-fps", "0"], "--video-fps must be a positive number"),
    ("pixels zero", ["--video", "{clip}", "--video-max-pixels", "0"], "--video-max-pixels must be a positive"),
    ("budget without a video", ["--video-max-frames", "4"], "no --video"),
])
def test_cli_bad_video_is_one_line_and_exit_2(qwen_export, clip, bad_videos, tmp_path, capsys, case, flags, says):
    names = {**bad_videos, "clip": clip, "missing": str(tmp_path / "nowhere.mp4")}
    flags = [flag.format(**names) for flag in flags]
    code, out, err = run_cli(capsys, "-m", qwen_export, *flags, "-p", PROMPT, "--threads", "1")
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and says in err, err


def test_cli_video_without_pyav_is_one_line(qwen_export, clip, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    code, out, err = run_cli(capsys, "-m", qwen_export, "--video", clip, "-p", PROMPT)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "PyAV" in err and "pip install" in err, err


def test_cli_video_too_long_for_the_context(qwen_export, vlm, clip, capsys):
    """Refused before any frame is decoded: the clip's frames and --max-new-tokens cannot fit the context."""
    code, out, err = run_cli(capsys, "-m", qwen_export, "--video", clip, "-p", PROMPT, "--threads", "1",
                             "--max-new-tokens", str(vlm.max_context - 8))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"error: --video {clip}") and "context" in err, err
    assert "--video-fps" in err and "--video-max-pixels" in err and "--max-new-tokens" in err, err


def test_cli_minigpt4_refuses_video(mg_export, clip, capsys):
    code, out, err = run_cli(capsys, "-m", mg_export, "--video", clip, "-p", PROMPT, "--threads", "1")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "reads images only" in err, err


# --- server ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(qwen_export):
    srv = Server(qwen_export)
    yield srv
    srv.stop()


def ask(server, messages, **fields):
    return server.request("POST", "/v1/chat/completions",
                          {"messages": messages, "max_tokens": N_TOKENS, "temperature": 0, **fields})


def test_streamed_video_url_answer_equals_the_api(server, vlm, clip):
    openai = pytest.importorskip("openai", reason="the official openai client is a test dependency")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    messages = video_messages({"type": "video_url", "video_url": {"url": video_data_url(clip)}})
    stream = client.chat.completions.create(model="qwen3-vl-tiny-onnx", messages=messages, max_tokens=N_TOKENS,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        usage = chunk.usage or usage
    expected = vlm.generate(messages, GREEDY, max_new_tokens=N_TOKENS)
    assert "".join(pieces) == expected.text
    assert usage.prompt_tokens == expected.prompt_tokens and usage.completion_tokens == N_TOKENS


def test_video_part_and_budget_fields_equal_the_api(server, vlm, clip):
    """transformers' spelling {"type": "video", "video": URL}, with video_max_frames from the request."""
    messages = video_messages({"type": "video", "video": video_data_url(clip)})
    status, _, answer = ask(server, messages, video_max_frames=2)
    assert status == 200, answer
    expected = vlm.generate(messages, GREEDY, max_new_tokens=N_TOKENS, video={"max_frames": 2})
    assert answer["choices"][0]["message"]["content"] == expected.text
    assert answer["usage"]["prompt_tokens"] == expected.prompt_tokens
    assert expected.prompt_tokens < len(vlm.prepare(messages).input_ids)  # the budget reached the engine


def test_animated_gif_as_a_video_url_equals_the_api(server, vlm, tmp_path):
    """An animated GIF sent as a video (image/gif data: URL) is read frame by frame, as the API reads the file."""
    from PIL import Image
    from skimage import data

    photo = Image.fromarray(data.coffee()).resize((128, 96))
    frames = [photo.crop((i * 8, i * 4, i * 8 + 64, i * 4 + 48)) for i in range(4)]
    path = str(tmp_path / "pan.gif")
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=250, loop=0)
    with open(path, "rb") as f:
        url = "data:image/gif;base64," + base64.b64encode(f.read()).decode()
    status, _, answer = ask(server, video_messages({"type": "video_url", "video_url": {"url": url}}))
    assert status == 200, answer
    expected = vlm.generate(video_messages({"type": "video", "video": path}), GREEDY, max_new_tokens=N_TOKENS)
    assert answer["choices"][0]["message"]["content"] == expected.text
    assert answer["usage"]["prompt_tokens"] == expected.prompt_tokens


def test_bad_videos_get_400_naming_the_field_and_the_server_keeps_serving(server, vlm, clip):
    with open(clip, "rb") as f:
        data = f.read()
    b64 = lambda payload: "data:video/mp4;base64," + base64.b64encode(payload).decode()  # noqa: E731
    part = lambda url: {"type": "video_url", "video_url": {"url": url}}  # noqa: E731
    where = "messages[0].content[0].video_url"
    cases = {
        "not a video": (video_messages(part(b64(b"hello, world"))), {}, where, "not a video"),
        "truncated": (video_messages(part(b64(data[: len(data) // 3]))), {}, where, "truncated"),
        "an image type": (video_messages(part("data:image/png;base64,AAAA")), {}, where, "not a video type"),
        "9000x9000 GIF": (video_messages(part("data:image/gif;base64," + base64.b64encode(huge_gif()).decode())), {},
                          where, "9000x9000"),  # the header check, naming the size, comes before PIL's
        "remote URL": (video_messages(part("https://example.com/clip.mp4")), {}, where, "--allow-remote-media"),
        "local path": (video_messages({"type": "video", "path": clip}), {}, "messages[0].content[0].path",
                       "never read"),
        "path as URL": (video_messages({"type": "video", "video": clip}), {}, "messages[0].content[0].video",
                        "never read"),
        "empty URL": (video_messages(part("")), {}, where, "non-empty string"),
        "assistant video": ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": [part(b64(data))]}],
                            {}, "messages[1].content[0]", "user messages"),
        "fps zero": (video_messages(part(b64(data))), {"video_fps": 0}, "video_fps", "positive number"),
        "frames not whole": (video_messages(part(b64(data))), {"video_max_frames": 2.5}, "video_max_frames",
                             "whole number"),
        "pixels as text": (video_messages(part(b64(data))), {"video_max_pixels": "lots"}, "video_max_pixels",
                           "positive"),
        "too long for the context": (video_messages(part(b64(data))), {"max_tokens": vlm.max_context - 8}, where,
                                     "video_max_frames"),
    }
    for name, (messages, fields, param, says) in cases.items():
        status, _, answer = ask(server, messages, **fields)
        assert status == 400, (name, answer)
        error = answer["error"]
        assert error["param"] == param and says in error["message"], (name, error)
    status, _, answer = ask(server, video_messages(part(b64(data))))
    assert status == 200, answer
    server.wait_idle()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_remote_video_with_allow_remote_media(qwen_export, vlm, clip):
    """--allow-remote-media lets a request name an http(s) video URL, fetched by the server."""
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            functools.partial(_QuietHandler, directory=os.path.dirname(clip)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    srv = Server(qwen_export, "--allow-remote-media")
    try:
        url = f"http://127.0.0.1:{files.server_address[1]}/{os.path.basename(clip)}"
        status, _, answer = ask(srv, video_messages({"type": "video_url", "video_url": {"url": url}}))
        assert status == 200, answer
        expected = vlm.generate(video_messages({"type": "video", "video": clip}), GREEDY, max_new_tokens=N_TOKENS)
        assert answer["choices"][0]["message"]["content"] == expected.text
    finally:
        srv.stop()
        files.shutdown()


def test_minigpt4_server_refuses_video_naming_the_part(mg_export, clip):
    srv = Server(mg_export)
    try:
        messages = [{"role": "user", "content": [{"type": "text", "text": "Look:"},
                                                 {"type": "video_url", "video_url": {"url": video_data_url(clip)}}]}]
        status, _, answer = ask(srv, messages)
        assert status == 400, answer
        assert answer["error"]["param"] == "messages[0].content[1].video_url"
        assert "reads images only" in answer["error"]["message"]
        status, _, answer = ask(srv, [{"role": "user", "content": "hi"}])
        assert status == 200, answer
    finally:
        srv.stop()


# --- chat page -------------------------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (apt-get install chromium)")
def test_chat_page_sends_a_chosen_video_as_a_video_url_part(server, vlm, clip):
    with chromium_page() as page:
        sent = []
        page.on("request", lambda r: sent.append(json.loads(r.post_data))
                if r.url.endswith("/v1/chat/completions") else None)
        open_greedy_page(page, server, N_TOKENS)
        assert page.get_attribute("#video", "accept") == "video/*,image/gif,image/webp"
        page.set_input_files("#video", clip)
        page.wait_for_selector("#attachments video")
        page.fill("#prompt", PROMPT)
        page.click("#send")
        page.wait_for_selector(".assistant .stats[data-finish]:not([data-finish=''])", timeout=30_000)
        part = sent[0]["messages"][0]["content"][0]
        assert part["type"] == "video_url" and part["video_url"]["url"] == video_data_url(clip)
        assert page.evaluate("(() => { const v = document.querySelector('.user video'); "
                             "return v && v.muted && v.controls; })()")
        expected = vlm.generate(sent[0]["messages"], GREEDY, max_new_tokens=N_TOKENS)
        assert page.text_content(".assistant .text") == expected.text
