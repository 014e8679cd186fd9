"""`python -m vlm_core.runtime.generate -m OUT [--image PATH ...] [--video PATH ...] -p TEXT`: answer a prompt, streaming
to stdout.

Serve-time only: numpy, onnxruntime, tokenizers, pillow, jinja2. Never imports torch or transformers.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys

from vlm_core.command_name import command_name
from vlm_core.errors import UserError
from vlm_core.kernels.grounding import GROUNDING_SCALE
from vlm_core.kernels.image import ImageError
from vlm_core.kernels.sampling import SamplingParamError, SamplingParams
from vlm_core.runtime.checks import check_text
from vlm_core.runtime.engine.onnx_sessions import check_threads
from vlm_core.runtime.output.grounding import answer_boxes
from vlm_core.runtime.output.result import ResultAccumulator, summarize_timings
from vlm_core.runtime.request import (
    SAMPLING_FIELDS,
    GenerationOptions,
    check_options,
    compile_grammar,
    sampling_over_defaults,
)

# The generation parameters as this command's user writes them (errors name the flags).
CLI_NAMES = {"max_new_tokens": "--max-new-tokens", "min_new_tokens": "--min-new-tokens", "stop": "--stop",
             "logprobs": "--logprobs", "batch_invariant": "--batch-invariant", "jump_forward": "--no-jump-forward"}

# The video budget flags, by VideoOptions field (models/media.py): errors name the flag.
VIDEO_FLAGS = {"fps": "--video-fps", "max_frames": "--video-max-frames", "max_pixels": "--video-max-pixels"}
# The image budget flags, by the family's check_pixel_budget names.
PIXEL_FLAGS = {"min_pixels": "--min-pixels", "max_pixels": "--max-pixels"}

# The most a prompt file (or standard input) and a schema or grammar file may hold. Every read stops one byte past
# its bound, so `-p @/dev/zero` or a FIFO is refused instead of filling memory. 16 MiB of text is millions of
# tokens, far over any context; real JSON schemas and Lark grammars are a few KB.
MAX_PROMPT_BYTES = 16 << 20
MAX_FORMAT_BYTES = 1 << 20


class MediaAction(argparse.Action):
    """--image / --video: append the path to its own list (`args.image`, `args.video`) and, with its kind, to
    `args.media`, which keeps the order of both flags as given: the order of the media in the user turn."""

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), value])
        namespace.media = [*(getattr(namespace, "media", None) or []), (self.dest, value)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=command_name("vlm-generate", "vlm_core.runtime.generate"),
                                description="Answer an image/video + text prompt with an exported model (CPU, no "
                                            "PyTorch).")
    p.add_argument("-m", "--model", required=True, help="exported model folder (from `python -m vlm_core.export`)")
    p.set_defaults(media=[])
    p.add_argument("--image", action=MediaAction, default=[], metavar="PATH",
                   help="an image; repeat for several (images and videos come before the text, in the order given)")
    p.add_argument("--video", action=MediaAction, default=[], metavar="PATH",
                   help="a video (Qwen3-VL): a video file (mp4, webm, mkv, ...: needs PyAV, the 'video' extra), an "
                        "animated GIF/WebP or a folder of frame images; repeatable, mixed with --image in the order "
                        "given")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("-p", "--prompt", metavar="TEXT",
                        help="the user's text; @FILE reads it from FILE, - from standard input (UTF-8, at most 16 "
                             "MiB; @@ for text that starts with @)")
    prompt.add_argument("--prompt-file", metavar="FILE", help="read the user's text from FILE (UTF-8, at most 16 MiB)")
    p.add_argument("--system", help="a system message (none is added unless given)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    p.add_argument("--min-new-tokens", type=int, default=0, help="EOS is suppressed until this many (default 0)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (overrides the sampling options)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: the model's generation config)")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--min-p", type=float, help="drop tokens below min_p x the top probability")
    p.add_argument("--repetition-penalty", type=float, help="CTRL-style repetition penalty (1 = off)")
    p.add_argument("--seed", type=int, help="sampler seed, for reproducible sampling")
    p.add_argument("--batch-invariant", action="store_true",
                   help="decode as a batch-invariant request does: the tokens are those the prompt gives in any batch "
                        "(int4 pads a lone row to the batched kernel; slower), e.g. to match a server's answer")
    p.add_argument("--no-jump-forward", dest="jump_forward", action="store_false",
                   help="decode the tokens a --json-schema or grammar forces one step each (for measurement; the "
                        "answer is the same). By default they go through the decoder as one chunk")
    p.add_argument("--no-prepacked-cache", dest="prepacked_cache", action="store_false",
                   help="pack a 4-bit decoder's weights in memory and write nothing to the model folder (default: "
                        "memory-map the pre-packed copy under MODEL/prepacked, written on this host's first load)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text; repeatable")
    p.add_argument("--min-pixels", type=int, help="smallest image area in pixels after resizing (token budget)")
    p.add_argument("--max-pixels", type=int, help="largest image area in pixels after resizing (token budget)")
    p.add_argument("--video-fps", type=float, metavar="FPS",
                   help="frames sampled per second of video (default: the model's video_preprocessor_config.json)")
    p.add_argument("--video-max-frames", type=int, metavar="N", help="most frames sampled from one video")
    p.add_argument("--video-max-pixels", type=int, metavar="N",
                   help="most pixels over all of a video's sampled frames after resizing (its token budget)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads, at most 4 per core (default: all cores)")
    p.add_argument("--dump-inputs", metavar="DIR",
                   help="write the model inputs (input_ids, pixel_values, image_grid_thw, position_ids; with videos "
                        "pixel_values_videos, video_grid_thw) as .npy")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with text, tokens, timings and the answer's boxes")
    constrain = p.add_mutually_exclusive_group()
    constrain.add_argument("--json-schema", metavar="FILE",
                           help="answer with JSON valid against the JSON schema in FILE (needs llguidance: the "
                                "'structured' extra)")
    constrain.add_argument("--json-object", action="store_true", help="answer with a JSON object (needs llguidance)")
    constrain.add_argument("--grammar", metavar="FILE",
                           help="answer in the Lark grammar in FILE, as llguidance reads it (needs llguidance)")
    p.add_argument("--logprobs", type=int, metavar="N",
                   help="with --json: each token's log-probability and its N (0-20) most likely alternatives")
    p.add_argument("--draw-boxes", metavar="OUT.png",
                   help="write the first image with the answer's boxes and points drawn on it (Qwen3-VL grounding; "
                        "nothing is written, and stderr says so, when the answer holds none)")
    return p


def _decode_utf8(data: bytes, source: str) -> str:
    """UTF-8 bytes (a leading BOM dropped) -> text with its trailing newlines dropped, as `-p "$(cat FILE)"`
    would give. UserError naming `source` and the first bad byte when the bytes are not UTF-8."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{source} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                        f"save it as UTF-8") from None
    return text.rstrip("\r\n")


def _read_at_most(file, limit: int, source: str, flag: str) -> bytes:
    """Up to `limit` bytes of the binary `file`; UserError naming `source` and `flag` when it holds more."""
    data = file.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{source} holds more than {limit >> 20} MiB, the most {flag} reads; give a smaller one")
    return data


def read_prompt_file(path: str, flag: str, what: str = "prompt file", limit: int = MAX_PROMPT_BYTES) -> str:
    """The text of the file `path` (UTF-8, at most `limit` bytes), or a UserError naming `flag` and the file
    (`what` it is)."""
    try:
        with open(path, "rb") as f:
            data = _read_at_most(f, limit, f"{flag}: {what} {path!r}", flag)
    except FileNotFoundError:
        raise UserError(f"{flag}: {what} {path!r} not found") from None
    except IsADirectoryError:
        raise UserError(f"{flag}: {path!r} is a folder, not a {what}") from None
    except OSError as e:
        raise UserError(f"{flag}: cannot read {what} {path!r} ({e.strerror})") from None
    return _decode_utf8(data, f"{flag}: {path!r}")


def prompt_from_args(args) -> str:
    """The user's text: `--prompt-file FILE`, or `-p`'s value, where `-` reads standard input, `@FILE` reads
    FILE and `@@TEXT` is the literal `@TEXT`. Text given on the command line must be valid UTF-8 (a
    byte that is not arrives as a lone surrogate, which the tokenizer refuses)."""
    if args.prompt_file is not None:
        return read_prompt_file(args.prompt_file, "--prompt-file")
    if args.prompt == "-":
        return _decode_utf8(_read_at_most(sys.stdin.buffer, MAX_PROMPT_BYTES, "-p -: standard input", "-p -"),
                            "-p -: standard input")
    if args.prompt.startswith("@@"):
        text = args.prompt[1:]
    elif args.prompt.startswith("@"):
        return read_prompt_file(args.prompt[1:], "-p @FILE")
    else:
        text = args.prompt
    check_text(text, "-p/--prompt")
    return text


def check_prompt(text: str, args) -> None:
    """Refuse an empty (or blank) prompt without an --image or --video: there is nothing to answer. The error
    names where the text came from (-p, -p -, -p @FILE, --prompt-file)."""
    if text.strip() or args.media:
        return
    if args.prompt_file is not None:
        source = f"--prompt-file {args.prompt_file!r}"
    elif args.prompt == "-":
        source = "-p -: standard input"
    elif args.prompt.startswith("@") and not args.prompt.startswith("@@"):
        source = f"-p @FILE {args.prompt[1:]!r}"
    else:
        source = "-p/--prompt"
    raise UserError(f"{source} is empty; give the text to answer (or an --image or --video to ask about)")


def sampling_from_args(args, defaults: dict) -> SamplingParams:
    """Flags over the model's generation_config defaults; --greedy wins. A value out of range is a
    UserError naming its flag (`--temperature`), not the SamplingParams field."""
    explicit = {name: getattr(args, name) for name in SAMPLING_FIELDS if getattr(args, name) is not None}
    try:
        return sampling_over_defaults(explicit, defaults, greedy=args.greedy, seed=args.seed)
    except SamplingParamError as e:
        raise UserError(e.naming(e.flag)) from None


def check_args(args) -> None:
    """Refuse, before the model loads, flags that cannot work; each error names its flag."""
    for flag in ("min_pixels", "max_pixels"):  # their upper bounds depend on the model (check_pixel_budget)
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    if args.min_pixels and args.max_pixels and args.min_pixels > args.max_pixels:
        raise UserError(f"--min-pixels ({args.min_pixels}) is larger than --max-pixels ({args.max_pixels})")
    check_threads(args.threads, "--threads")
    for image in args.image:
        if not os.path.isfile(image):
            raise UserError(f"--image {image!r} does not exist or is not a file")
    check_videos(args)
    if args.system is not None:
        check_text(args.system, "--system")
    if args.dump_inputs and os.path.exists(args.dump_inputs) and not os.path.isdir(args.dump_inputs):
        raise UserError(f"--dump-inputs {args.dump_inputs!r} is a file, not a folder; give a folder "
                        f"(it is created if missing)")
    if args.draw_boxes is not None:
        check_draw_boxes(args.draw_boxes, args.image)
    if args.logprobs is not None and not args.json:
        raise UserError("--logprobs adds the log-probabilities to the --json output; add --json")
    options_from_args(args, {})  # every generation flag, checked before a model is loaded


def options_from_args(args, defaults: dict) -> GenerationOptions:
    """The generation flags -> GenerationOptions, checked once (errors name the flags); sampling over the model's
    generation_config `defaults`. The response format is compiled later, by the loaded model."""
    return check_options(sampling_from_args(args, defaults), args.max_new_tokens, args.min_new_tokens, args.stop,
                         args.logprobs, batch_invariant=args.batch_invariant or None, names=CLI_NAMES,
                         jump_forward=None if args.jump_forward else False)


def video_options_from_args(args):
    """The --video-* budget flags -> models.media.VideoOptions (None when none is given); each error names its
    flag. The flags without a --video are refused: they would change nothing."""
    from vlm_core.models.media import VideoOptions

    given = {field: getattr(args, "video_" + field) for field in VIDEO_FLAGS
             if getattr(args, "video_" + field) is not None}
    if not given:
        return None
    if not args.video:
        flags = ", ".join(VIDEO_FLAGS[field] for field in given)
        raise UserError(f"{flags}: a budget for --video clips, but no --video is given; add one or drop the flag")
    options = VideoOptions(**given)
    try:
        options.check(VIDEO_FLAGS)
    except ValueError as e:
        raise UserError(str(e)) from None
    return options


def check_videos(args) -> None:
    """Refuse, before the model loads, a --video that cannot be read: missing, not a video, no frames, frames too
    large, PyAV missing for a video file (only the container's header is read; no frame is decoded)."""
    video_options_from_args(args)
    for video in args.video:
        if not os.path.exists(video):
            raise UserError(f"--video {video!r}: no such file or folder")
    if args.video:
        from vlm_core.kernels.video import VideoError, probe_video

        for video in args.video:
            try:
                probe_video(video)
            except VideoError as e:  # its message starts with the path
                raise UserError(f"--video {e}") from None


def media_messages(prompt: str, media: list, system: str | None) -> list:
    """The CLI's messages: `build_user_messages`' (optional system message, then one user turn) with the --image /
    --video parts first, in the order given on the command line, then the text."""
    from vlm_core.runtime.chat.messages import build_user_messages

    messages = build_user_messages(prompt, [], system)
    messages[-1]["content"][:0] = [{"type": kind, kind: path} for kind, path in media]
    return messages


def prepare_prompt(model, messages: list, args, video):
    """`model.prepare` with the image and video budgets; an image that cannot be read is a UserError naming --image
    and the path, and a clip that cannot be decoded, or whose frames cannot fit the context with --max-new-tokens
    (refused before decoding), one naming --video and the path. Images scaled down to fit the context (no
    --max-pixels given) are a `note:` line on stderr."""
    model.family.check_pixel_budget(args.min_pixels, args.max_pixels, PIXEL_FLAGS)
    from vlm_core.kernels.video import VideoError, VideoTooLong

    try:
        prompt = model.prepare(messages, min_pixels=args.min_pixels, max_pixels=args.max_pixels, video=video,
                               max_new_tokens=args.max_new_tokens, names=PIXEL_FLAGS)
    except ImageError as e:  # its message starts with the path
        raise UserError(f"--image {e}") from None
    except VideoTooLong as e:
        raise UserError("--video " + e.message(("--video-fps", "--video-max-frames", "--video-max-pixels",
                                                "lower --max-new-tokens"))) from None
    except VideoError as e:  # its message starts with the path
        raise UserError(f"--video {e}") from None
    for warning in prompt.warnings:  # images scaled down to fit the context: one line each, the answer goes on
        print(f"note: {warning}", file=sys.stderr)
    return prompt


def check_draw_boxes(out: str, images: list) -> None:
    """Refuse a --draw-boxes that cannot be written: no --image to draw on, a folder, a missing folder, or a file
    name whose extension names no image format Pillow writes."""
    from PIL import Image

    if not images:
        raise UserError("--draw-boxes needs an image to draw on; give one with --image")
    if os.path.isdir(out):
        raise UserError(f"--draw-boxes {out!r} is a folder; give a file name such as boxes.png")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise UserError(f"--draw-boxes {out!r}: folder {folder!r} does not exist")
    image_format = Image.registered_extensions().get(os.path.splitext(out)[1].lower())
    if image_format is None or image_format not in Image.SAVE:
        raise UserError(f"--draw-boxes {out!r}: the extension names no image format that can be written; "
                        f"use .png or .jpg")


def draw_answer_boxes(answer: str, image: str, out: str, scale: float = GROUNDING_SCALE) -> list:
    """--draw-boxes: write `image` (as the user sees it: EXIF orientation applied) with the answer's boxes and
    points drawn on it to `out`, and return the boxes (kernels.grounding.to_pixels' dicts).

    When the answer holds no box or point, nothing is written (a file already at `out` is left as it is) and a
    line on stderr says so: the answer itself is not an error, so the exit status stays 0."""
    from vlm_core.kernels.grounding import draw_grounding, grounding_boxes
    from vlm_core.kernels.image import open_image

    try:
        picture = open_image(image)
    except ImageError as e:  # its message starts with the path
        raise UserError(f"--image {e}") from None
    boxes = grounding_boxes(answer, picture.width, picture.height, scale)
    if not boxes:
        print(f"--draw-boxes: the answer holds no boxes or points; {out!r} not written", file=sys.stderr)
        return boxes
    drawn = draw_grounding(picture, boxes)
    try:
        drawn.save(out)
    except (OSError, ValueError) as e:
        raise UserError(f"--draw-boxes {out!r}: cannot write the image ({e})") from None
    return boxes


def response_format_from_args(args) -> tuple[dict | None, str]:
    """(the response_format that --json-schema / --json-object / --grammar asks for or None, the flag as errors
    name it). Files are read and checked here, before the model loads; each error names its flag."""
    from vlm_core.runtime.output.constraint import check_grammar

    if args.json_object:
        response_format, flag = {"type": "json_object"}, "--json-object"
    elif args.json_schema is not None:
        flag = f"--json-schema {args.json_schema!r}"
        schema = read_prompt_file(args.json_schema, "--json-schema", "schema file", MAX_FORMAT_BYTES)
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise UserError(f"{flag} is not valid JSON ({e})") from None
        if not isinstance(schema, dict):
            raise UserError(f"{flag} must hold a JSON schema (a JSON object), not {type(schema).__name__}")
        response_format = {"type": "json_schema", "json_schema": {"name": "cli", "schema": schema}}
    elif args.grammar is not None:
        flag = f"--grammar {args.grammar!r}"
        response_format = {"type": "grammar",
                           "grammar": read_prompt_file(args.grammar, "--grammar", "grammar file", MAX_FORMAT_BYTES)}
    else:
        return None, ""
    check_grammar(response_format, flag)
    return response_format, flag


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def dump_inputs(folder: str, prompt) -> None:
    """Write the prompt's model inputs as .npy files into `folder` (created if missing)."""
    import numpy as np

    try:
        os.makedirs(folder, exist_ok=True)
        for name, array in prompt.dump().items():
            np.save(os.path.join(folder, name + ".npy"), array)
    except OSError as e:
        raise UserError(f"--dump-inputs {folder!r}: cannot write there ({e.strerror})") from None


def run(args) -> int:
    prompt_text = prompt_from_args(args)
    check_prompt(prompt_text, args)
    check_args(args)
    response_format, format_flag = response_format_from_args(args)
    video = video_options_from_args(args)
    from vlm_core.runtime.model import VisionLanguageModel

    model = VisionLanguageModel(args.model, threads=args.threads, prepacked_cache=args.prepacked_cache)
    scale = model.family.grounding_scale
    if args.draw_boxes is not None and not scale:
        raise UserError(f"--draw-boxes: {model.manifest['family']} models write no boxes or points "
                        f"(grounding is a Qwen3-VL output)")
    options = options_from_args(args, model.generation_defaults)
    options = compile_grammar(dataclasses.replace(options, response_format=response_format), model.grammars,
                              model.tokenizer, names={"response_format": format_flag or "--json-schema"})
    messages = media_messages(prompt_text, args.media, args.system)
    prompt = prepare_prompt(model, messages, args, video)
    if args.dump_inputs:
        dump_inputs(args.dump_inputs, prompt)
    model.check_context(len(prompt.input_ids), args.max_new_tokens,
                        names={"max_new_tokens": "--max-new-tokens", "max_pixels": "--max-pixels"})
    timings, accumulated = {}, ResultAccumulator()
    for chunk in model.stream_generate(prompt, timings=timings, options=options):
        if not args.json and chunk.text:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        accumulated.add(chunk)
    answer = accumulated.text
    if not args.json:
        sys.stdout.write("\n")
    if args.draw_boxes is not None:
        boxes = draw_answer_boxes(answer, args.image[0], args.draw_boxes, scale)
    else:  # one user turn: its first image is the one the boxes refer to (runtime/output/grounding.py)
        boxes = answer_boxes(answer, getattr(prompt, "grounding_image", None), scale)
    if args.json:
        result = accumulated.result(prompt, summarize_timings(timings, model.load_s), int(timings.get("cached_tokens", 0)),
                                    boxes, logprobs_requested=args.logprobs is not None).to_dict()
        result["peak_rss_mb"] = round(peak_rss_mb(), 1)
        print(json.dumps(result, ensure_ascii=False))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (UserError, ImageError, ValueError) as e:  # user mistakes (VideoError too): one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
