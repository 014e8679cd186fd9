"""The serve-time model: load an exported folder once, answer many prompts.

Layered like mlx-lm: `generate_step` yields token ids from prepared inputs, `stream_generate`
yields text deltas with timings, `generate` joins them. Every request becomes a Sequence in the
model's BatchEngine (runtime/engine/step_loop.py), so requests from several threads are decoded
together and share the prefix and image-feature caches; `generate_batch` submits many at once and
`chat()` keeps a conversation whose turns reuse the cache. Never imports torch or transformers.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from vlm_core.errors import ContextLengthError, ModelFolderError, ParameterError
from vlm_core.kernels.image import peek_size
from vlm_core.kernels.image_url import fetch_remote_image, is_remote_url
from vlm_core.kernels.sampling import SamplingParams
from vlm_core.models import get_family
from vlm_core.models.config import TextConfig
from vlm_core.models.media import VideoOptions, VideoPart
from vlm_core.runtime.chat.messages import build_user_messages, normalize_messages
from vlm_core.runtime.chat.template import render_chat
from vlm_core.runtime.chat.tools import ToolCallParser
from vlm_core.runtime.engine.kv_buffer import KVCache
from vlm_core.runtime.engine.memory_hints import graph_files, release_freed_heap
from vlm_core.runtime.engine.onnx_sessions import check_threads, create_session
from vlm_core.runtime.engine.runner import ModelRunner
from vlm_core.runtime.engine.sequence import GenerationChunk, Sequence
from vlm_core.runtime.engine.step_loop import (
    DEFAULT_CACHE_MB,
    DEFAULT_PARALLEL,
    DEFAULT_PREFILL_CHUNK,
    VISION_PATCHES_PER_CALL,
    BatchEngine,
)
from vlm_core.runtime.manifest import (
    load_chat_template,
    load_embeddings,
    load_manifest,
    load_tokenizer,
)
from vlm_core.runtime.output.constraint import GrammarCompiler
from vlm_core.runtime.output.grounding import answer_boxes, grounding_image
from vlm_core.runtime.output.logprobs import TokenTable
from vlm_core.runtime.output.result import (
    GenerationResult,
    ResultAccumulator,
    summarize_timings,
)
from vlm_core.runtime.request import GenerationOptions, check_options, compile_grammar

# The tokens left for the answer when images are scaled to fit the context and the caller gave no max_new_tokens
# (the API's and the CLI's default max_new_tokens), at most a quarter of the context.
ANSWER_ROOM = 256


def _fetch_if_remote(source):
    """An image or clip source given as an http(s) URL -> its bytes (same wrapper); anything else unchanged."""
    if isinstance(source, VideoPart):
        url = source.source
        return VideoPart(fetch_remote_image(url, kind="video")) if isinstance(url, str) and is_remote_url(url) else source
    return fetch_remote_image(source) if is_remote_url(source) else source


class VisionLanguageModel:
    """An exported model folder, loaded: ONNX Runtime sessions, tokenizer, chat template, embeddings.

    Args:
        folder: the OUT folder written by `python -m vlm_core.export`.
        threads: intra-op threads for ONNX Runtime, 1 to 4 per usable core (default: all cores).
        parallel: sequences decoded together at most (more requests wait their turn).
        prefill_chunk: prompt tokens per decoder call; a new prompt holds running answers up for one chunk.
        cache_mb: memory for the prefix-KV and image-feature caches, least recently used evicted (0: off).
        batch_invariant: the default for requests that do not say: True makes a request's tokens independent
            of what is batched with it, at a cost in speed on int4/int8 graphs (see runtime/engine/decode_plan.py);
            False (default) lets the engine pick the fastest kernels. A request's own `batch_invariant` wins.
        jump_forward: the default for requests that do not say: True (default) runs the tokens a grammar forces
            as one decoder chunk, checked as sampled (runtime/engine/jump_forward.py); False: one step each.
        allow_remote_images: fetch images given as http(s) URLs (off: such a URL is refused with an ImageError;
            data: URLs are always decoded).
        prepacked_cache: load the 4-bit (MatMulNBits) graphs with their pre-packed weights memory-mapped from a
            copy under `folder`/prepacked, written on this host's first load (see runtime/engine/prepacked.py):
            file-backed pages instead of anonymous memory. False packs in memory at every load and writes
            nothing.
    """

    def __init__(self, folder: str, threads: int | None = None, parallel: int = DEFAULT_PARALLEL,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, cache_mb: float = DEFAULT_CACHE_MB,
                 batch_invariant: bool = False, allow_remote_images: bool = False, jump_forward: bool = True,
                 prepacked_cache: bool = True):
        start = time.perf_counter()
        self.folder = folder
        self.allow_remote_images = allow_remote_images
        self.batch_invariant = bool(batch_invariant)
        self.jump_forward = bool(jump_forward)
        check_threads(threads)
        self.manifest = manifest = load_manifest(folder)
        try:
            self.text_config = TextConfig.from_dict(manifest["text_config"])
            family = get_family(manifest["family"])
        except (KeyError, ValueError) as e:  # an unknown family
            raise ModelFolderError(f"{folder!r}: {e.args[0]}") from None
        try:
            self.family = family.Family(manifest)
        except KeyError as e:  # a field the family reads (special_tokens.image_token_id, say) is missing
            raise ModelFolderError(f"{folder!r}: manifest.json lacks {e.args[0]!r}, which the "
                                   f"{manifest['family']} family reads; re-export the model") from None
        except (ValueError, TypeError) as e:  # a family's config field missing, mistyped or out of range
            raise ModelFolderError(f"{folder!r}: {e}") from None

        # Session creation (reading and pre-packing weights) runs in ORT's C++ code without the GIL:
        # the graphs load side by side while the tokenizer is parsed here.
        pool = ThreadPoolExecutor(max_workers=len(manifest["graphs"]))
        formats = {name: entry.get("format") for name, entry in manifest.get("quantization", {}).items()
                   if isinstance(entry, dict)}
        sessions = {name: pool.submit(create_session, folder, graph, threads, arena=name != "vision",
                                      prepack=name != "vision",
                                      cache_prepacked=prepacked_cache and formats.get(name) == "MatMulNBits")
                    for name, graph in manifest["graphs"].items()}
        self.tokenizer = load_tokenizer(folder, manifest)
        self.chat_template = load_chat_template(folder, manifest)
        self.embeddings, self.embedding_scale = load_embeddings(folder, manifest)
        self.sessions = {name: future.result() for name, future in sessions.items()}
        pool.shutdown()
        text = self.text_config
        self.num_layers, self.num_kv_heads, self.head_dim = text.num_layers, text.num_kv_heads, text.head_dim
        self.max_context = text.max_context
        self.kv_dtype = np.dtype(text.kv_dtype)  # the KV cache's dtype (the decoder graph's past/present I/O)
        self.eos_token_ids = [int(t) for t in manifest["special_tokens"].get("eos_token_ids", [])]
        # Constrained decoding (response_format): llguidance's tokenizer is built on the first such request.
        self.grammars = GrammarCompiler(os.path.join(folder, manifest["tokenizer"]), self.embeddings.shape[0],
                                        self.eos_token_ids)
        self.token_table = TokenTable(self.tokenizer)  # token text and bytes for logprobs
        self.generation_defaults = manifest.get("generation", {})
        for name, value, low in (("parallel", parallel, 1), ("prefill_chunk", prefill_chunk, 1), ("cache_mb", cache_mb, 0)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be a number >= {low}, got {value!r}")
        # what runs the graphs, for the engine and for this facade's prefill / run_decoder / encode_images alike
        vision = manifest["graphs"].get("vision")
        self.runner = ModelRunner(self.family, self.sessions, self.embeddings, self.embedding_scale, self.text_config,
                                  manifest.get("quantization", {}).get("method", "none"),
                                  vision_files=frozenset(graph_files(folder, vision)) if vision else frozenset())
        self.engine = BatchEngine(self.runner, parallel=parallel, prefill_chunk=prefill_chunk, cache_mb=cache_mb)
        release_freed_heap()  # what parsing the graphs and the tokenizer left behind (~115 MB on the 2B export)
        self.load_s = time.perf_counter() - start

    # --- inputs -------------------------------------------------------------------------------
    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        """Token ids [S] -> float32 [S, H], from the memory-mapped table."""
        return self.runner.embed(token_ids)

    def render(self, messages: list, tools: list | None = None) -> tuple[str, list]:
        """Chat messages -> (prompt text with one image pad per image, image sources in order).

        `tools` (OpenAI function tools) are passed to the chat template as given, as transformers'
        ``apply_chat_template(tools=...)`` does."""
        template_messages, images = normalize_messages(messages)
        return self._render(template_messages, tools), images

    def _render(self, template_messages: list, tools: list | None) -> str:
        """Normalised messages -> the prompt text (the chat template rendered as transformers does)."""
        if self.chat_template is None:
            raise ModelFolderError(f"{self.folder!r} has no chat template; pass token ids instead")
        variables = self.manifest.get("template_variables", {})
        return render_chat(self.chat_template, template_messages, add_generation_prompt=True, tools=tools or None,
                           **variables)

    def prepare(self, messages: list, min_pixels: int | None = None, max_pixels: int | None = None,
                tools: list | None = None, video: VideoOptions | None = None, max_new_tokens: int = 0,
                names: dict | None = None):
        """Chat messages (transformers' processor format) -> the family's PreparedPrompt (`tools` rendered
        by the chat template).

        `min_pixels` / `max_pixels` bound each image; `video` (VideoOptions: fps, max_frames, max_pixels)
        each clip. Clips are probed before any frame is decoded: ones that cannot fit the context with
        `max_new_tokens` are refused then (VideoError). Without `max_pixels`, images that would not fit the
        context beside the text and the answer (`max_new_tokens`, or ANSWER_ROOM tokens when 0) are scaled down
        (`fit_images`), and `prompt.warnings` says so, naming `names["max_pixels"]` (default ``max_pixels``)."""
        template_messages, sources = normalize_messages(messages)  # the one normalisation of these messages
        text = self._render(template_messages, tools)
        if self.allow_remote_images:  # otherwise load_image refuses http(s) URLs (and decodes data: URLs)
            sources = [_fetch_if_remote(source) for source in sources]
        media, warnings = None, []
        if sources and max_pixels is None:
            max_pixels, warnings = self.fit_images(text, sources, min_pixels, max_new_tokens, names)
        if sources:
            media = self.family.preprocess(sources, min_pixels=min_pixels, max_pixels=max_pixels, video=video,
                                           token_limit=max(self.max_context - max_new_tokens, 0))
        input_ids = self.family.tokenize(self.tokenizer, text, media)
        if media is None:
            prompt = self.family.prepare(input_ids)
        else:
            prompt = self.family.prepare(input_ids, media.pixel_values, media.grid_thw, media.kinds)
        prompt.warnings = warnings
        if self.family.grounding_scale:  # the image an answer's boxes refer to
            prompt.grounding_image = grounding_image(template_messages,
                                                     [s for s in sources if not isinstance(s, VideoPart)])
        return prompt

    def fit_images(self, text: str, sources: list, min_pixels: int | None, max_new_tokens: int,
                   names: dict | None = None) -> tuple[int | None, list]:
        """The default image budget, which follows the context: (max_pixels, warnings). When the images (their
        sizes read from their headers) would take more tokens than the context leaves beside the rendered `text`
        and the answer (`max_new_tokens`, or ANSWER_ROOM when 0), the family's largest per-image max_pixels that
        fits, and one warning saying so; else (None, []), the model's own budget. Videos keep their own budget
        (video_max_pixels) and are not counted here; an image whose header cannot be read is left to the full
        load to report."""
        images = [s for s in sources if not isinstance(s, VideoPart)]
        sizes = [size for size in (peek_size(s) for s in images) if size is not None]
        if not sizes:
            return None, []
        answer = max_new_tokens if max_new_tokens > 0 else min(ANSWER_ROOM, self.max_context // 4)
        # The unexpanded text holds one placeholder token per image: counting it errs on the safe side.
        text_tokens = len(self.tokenizer.encode(text, add_special_tokens=False).ids)
        token_limit = self.max_context - answer - text_tokens
        budget = self.family.fit_image_budget(sizes, token_limit, min_pixels)
        if budget is None:
            return None, []
        name = {"max_pixels": "max_pixels", **(names or {})}["max_pixels"]
        what = "the image" if len(images) == 1 else f"the {len(images)} images"
        warning = (f"images scaled down: {what} would not fit this model's context of {self.max_context} tokens "
                   f"beside the text ({text_tokens} tokens) and {answer} for the answer, so each was resized to at "
                   f"most {budget} pixels ({max(token_limit, 0)} image tokens at most); give {name} to choose the "
                   f"image budget")
        return budget, [warning]

    # --- generation ---------------------------------------------------------------------------
    def run_decoder(self, feeds: dict, cache: KVCache) -> np.ndarray:
        """One batch-1 decoder call on `feeds` (the family's inputs) over `cache`, which takes the new tokens
        in place; returns the last position's logits [vocab]."""
        return self.runner.run_decoder(feeds, cache)

    def encode_images(self, prompt):
        """Run the vision graph on the prompt's images: (image_embeds, deepstack_embeds) or None."""
        return self.runner.encode_images(prompt, VISION_PATCHES_PER_CALL)

    def new_cache(self, expected_length: int) -> KVCache:
        """An empty KV cache for a request of at most `expected_length` tokens (prompt + new tokens).

        It stays empty until the prompt is written, then grows geometrically (runtime/engine/kv_buffer.py), never
        past `expected_length`."""
        return self.runner.new_cache(expected_length)

    def prefill(self, prompt, cache: KVCache | None = None, vision_outputs=None) -> np.ndarray:
        """Run the whole prompt through the decoder; returns the last position's logits [vocab]."""
        if cache is None:
            cache = self.new_cache(len(prompt.input_ids))
            vision_outputs = self.encode_images(prompt)
        return self.runner.prefill(prompt, cache, vision_outputs)

    def check_context(self, prompt_tokens: int, max_new_tokens: int, names: dict | None = None) -> None:
        """Refuse, before any work, a request that cannot fit the context.

        `names` maps the parameters `max_new_tokens` / `max_pixels` to what the caller wrote (the CLI's flags)."""
        if prompt_tokens + max_new_tokens > self.max_context:
            names = {"max_new_tokens": "max_new_tokens", "max_pixels": "max_pixels", **(names or {})}
            raise ContextLengthError(
                f"the prompt has {prompt_tokens} tokens and {names['max_new_tokens']} is {max_new_tokens}: together "
                f"{prompt_tokens + max_new_tokens}, over this model's context of {self.max_context} tokens; "
                f"shorten the prompt, use fewer or smaller images ({names['max_pixels']}), or lower "
                f"{names['max_new_tokens']}")

    def options(self, sampling: SamplingParams | None = None, max_new_tokens: int = 256, min_new_tokens: int = 0,
                stop=None, response_format=None, logprobs: int | None = None, tools: list | None = None,
                tool_choice=None, parallel_tool_calls: bool = True, video: VideoOptions | dict | None = None,
                batch_invariant: bool | None = None, jump_forward: bool | None = None) -> GenerationOptions:
        """The generation arguments, checked once and their grammar compiled -> GenerationOptions.

        Args:
            sampling: SamplingParams (default: greedy).
            max_new_tokens / min_new_tokens: length limits (EOS is suppressed until the minimum).
            stop: a stop text or a list of them (the family's own are always added).
            response_format: constrain the answer (needs the `structured` extra, llguidance):
                ``{"type": "json_object"}`` (any JSON object), ``{"type": "json_schema", "json_schema":
                {"name": ..., "schema": {...}}}``, ``{"type": "grammar", "grammar": LARK}``, ``{"type":
                "text"}`` / None (free text), or a Grammar from ``self.grammars.compile``. The answer ends
                ("stop") when the grammar is complete.
            logprobs: report each token's log-probability and its this many (0-20) most likely
                alternatives (on each chunk; see runtime/output/logprobs.py); None: not computed.
            tools: OpenAI function tools (``{"type": "function", "function": {"name", "description",
                "parameters"}}``), rendered by the chat template when the prompt is messages; the model's
                ``<tool_call>`` blocks become `chunk.tool_calls` (the chunk text is the content outside them).
            tool_choice: "auto" (default), "none" (tools rendered, no calls parsed), "required" or
                ``{"type": "function", "function": {"name": ...}}`` (decoding constrained to a call of one
                of the tools, or of the named one, whose arguments fit its parameters; see runtime/chat/tools.py).
            parallel_tool_calls: with "required", allow several calls in one answer.
            video: the clips' budget when the prompt is messages: VideoOptions or a dict with ``fps`` (frames
                sampled per second), ``max_frames``, ``max_pixels`` (over all of a clip's frames); None: the
                model's video_preprocessor_config.json.
            batch_invariant: True: this request's tokens are exactly what it gives alone, whatever is decoded
                beside it (greedy and seeded sampling; costs speed on int4 and int8 graphs); None: the model's
                default (the `batch_invariant` it was loaded with).
            jump_forward: False: tokens a grammar forces are decoded one step each, as free tokens are (for
                measurement and debugging; the answer is the same either way, but for float-level near-ties);
                None: the model's default (the `jump_forward` it was loaded with, True unless said).

        Raises ParameterError naming the parameter (a bad schema or grammar: response_format)."""
        options = check_options(sampling, max_new_tokens, min_new_tokens, stop, logprobs, response_format, tools,
                                tool_choice, parallel_tool_calls, video, batch_invariant, jump_forward=jump_forward)
        return compile_grammar(options, self.grammars, self.tokenizer)

    def submit(self, prompt, options: GenerationOptions, family_stops: bool = True) -> Sequence:
        """Queue one prompt (a PreparedPrompt or chat messages) with checked `options` (from `options()`, or a
        front end's `check_options` + `compile_grammar`) in the engine; read `sequence.chunks()`.

        Messages are prepared here (their tools rendered, clips that cannot fit the context refused before any
        frame is decoded); a prompt that does not fit the context with max_new_tokens is refused
        (ContextLengthError). Nothing in `options` is checked again. `family_stops=False`: the family's own stop
        strings do not end the answer (token ids only, as `generate_step` yields them)."""
        if isinstance(prompt, list):
            prompt = self.prepare(prompt, tools=options.tools, video=options.video,
                                  max_new_tokens=options.max_new_tokens)
        self.check_context(len(prompt.input_ids), options.max_new_tokens)
        use = options.tool_use
        invariant = self.batch_invariant if options.batch_invariant is None else options.batch_invariant
        jump = self.jump_forward if options.jump_forward is None else options.jump_forward
        sequence = Sequence(prompt, options.sampling, options.max_new_tokens, options.min_new_tokens,
                            list(options.stop) + (list(self.family.stop_strings) if family_stops else []),
                            self.eos_token_ids, self.tokenizer,
                            constraint=self.grammars.constraint(options.grammar) if options.grammar else None,
                            logprobs=options.logprobs, token_table=self.token_table,
                            tool_parser=ToolCallParser() if use is not None and use.parses_calls else None,
                            batch_invariant=invariant, jump_forward=jump)
        # the prefix and image-cache keys, images hashed here on the caller's thread rather than the engine's
        sequence.key_ids, sequence.image_digests = self.engine.prompt_keys(prompt)
        return self.engine.submit(sequence)

    def generate_step(self, prompt, sampling: SamplingParams | None = None, max_new_tokens: int = 256,
                      min_new_tokens: int = 0, timings: dict | None = None, batch_invariant: bool | None = None):
        """Yield generated token ids one at a time (EOS included, then stop); no stop strings.

        Args:
            prompt: a PreparedPrompt from `prepare` (or the family's `prepare` on raw ids).
            sampling: SamplingParams (default: greedy).
            timings: a dict filled with vision_s, prefill_s, ttft_s, decode_s when the answer ends.
        """
        options = check_options(sampling, max_new_tokens, min_new_tokens, batch_invariant=batch_invariant)
        sequence = self.submit(prompt, options, family_stops=False)
        try:
            for chunk in sequence.chunks():
                if chunk.token_id is not None:
                    yield chunk.token_id
        finally:
            sequence.cancel()
            if timings is not None:
                timings.update(sequence.timings, cached_tokens=sequence.cached_tokens)

    def stream_generate(self, prompt, sampling: SamplingParams | None = None, max_new_tokens: int = 256,
                        min_new_tokens: int = 0, stop: list | None = None, timings: dict | None = None,
                        response_format=None, logprobs: int | None = None, tools: list | None = None,
                        tool_choice=None, parallel_tool_calls: bool = True, video: VideoOptions | dict | None = None,
                        batch_invariant: bool | None = None, options: GenerationOptions | None = None,
                        jump_forward: bool | None = None):
        """Yield GenerationChunk text deltas (never a broken UTF-8 character); the last one has finish_reason.

        `prompt` is a PreparedPrompt or a list of chat messages; the other arguments as in `options()`, or
        `options` already made by it (the arguments are then ignored). Closing the generator early cancels
        the request (its decoder row is freed at the engine's next step). A chunk carrying a token has its
        `logprobs` when asked for; with `tools`, chunk text is the content and a chunk completing a call
        carries it in `tool_calls`."""
        if options is None:
            options = self.options(sampling, max_new_tokens, min_new_tokens, stop, response_format, logprobs,
                                   tools, tool_choice, parallel_tool_calls, video, batch_invariant, jump_forward)
        sequence = self.submit(prompt, options)
        try:
            yield from sequence.chunks()
        finally:
            sequence.cancel()
            if timings is not None:
                timings.update(sequence.timings, cached_tokens=sequence.cached_tokens)

    def _result(self, sequence: Sequence) -> GenerationResult:
        answer = ResultAccumulator()
        for chunk in sequence.chunks():
            answer.add(chunk)
        prompt = sequence.prompt
        boxes = answer_boxes(answer.text, getattr(prompt, "grounding_image", None), self.family.grounding_scale)
        return answer.result(prompt, summarize_timings(sequence.timings, self.load_s), sequence.cached_tokens,
                             boxes, logprobs_requested=sequence.logprobs is not None)

    def generate(self, prompt, sampling: SamplingParams | None = None, max_new_tokens: int = 256,
                 min_new_tokens: int = 0, stop: list | None = None, response_format=None,
                 logprobs: int | None = None, tools: list | None = None, tool_choice=None,
                 parallel_tool_calls: bool = True, video: VideoOptions | dict | None = None,
                 batch_invariant: bool | None = None, options: GenerationOptions | None = None,
                 jump_forward: bool | None = None) -> GenerationResult:
        """The whole answer to `prompt` (a PreparedPrompt or chat messages) as a GenerationResult.

        The arguments as in `options()` (or `options` already made by it). `response_format` constrains the
        answer (e.g. ``{"type": "json_object"}``) and `logprobs=N` fills `result.logprobs`; with `tools`,
        `result.tool_calls` holds the calls and `result.text` the content outside them."""
        if options is None:
            options = self.options(sampling, max_new_tokens, min_new_tokens, stop, response_format, logprobs,
                                   tools, tool_choice, parallel_tool_calls, video, batch_invariant, jump_forward)
        sequence = self.submit(prompt, options)
        try:
            return self._result(sequence)
        finally:
            sequence.cancel()

    def generate_batch(self, prompts: list, sampling=None, max_new_tokens: int = 256, min_new_tokens: int = 0,
                       stop: list | None = None, response_format=None, logprobs: int | None = None,
                       batch_invariant: bool | None = None, jump_forward: bool | None = None) -> list:
        """Answer many prompts at once (decoded together, `parallel` at a time): a GenerationResult each.

        Args:
            prompts: chat message lists or PreparedPrompts.
            sampling: one SamplingParams for all, or a list with one per prompt (each keeps its own seed).
            response_format: one for all, or a list with one per prompt (None entries: free text); see `options`.
        Every argument and every prompt is checked before any prompt is queued.
        """
        samplings = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
        if len(samplings) != len(prompts):
            raise ParameterError(f"sampling has {len(samplings)} entries for {len(prompts)} prompts; give one per "
                                 f"prompt", "sampling")
        formats = (list(response_format) if isinstance(response_format, (list, tuple))
                   else [response_format] * len(prompts))
        if len(formats) != len(prompts):
            raise ParameterError(f"response_format has {len(formats)} entries for {len(prompts)} prompts; give one "
                                 f"per prompt", "response_format")
        options = [self.options(s, max_new_tokens, min_new_tokens, stop, f, logprobs, batch_invariant=batch_invariant,
                                jump_forward=jump_forward) for s, f in zip(samplings, formats)]  # all errors first
        prepared = [self.prepare(p, max_new_tokens=max_new_tokens) if isinstance(p, list) else p for p in prompts]
        for prompt in prepared:
            self.check_context(len(prompt.input_ids), max_new_tokens)
        sequences = [self.submit(p, o) for p, o in zip(prepared, options)]
        try:
            return [self._result(sequence) for sequence in sequences]
        finally:
            for sequence in sequences:
                sequence.cancel()

    def chat(self, system: str | None = None, **generation):
        """A conversation that keeps its history; each turn reuses the previous turns' KV (prefix cache).

        `generation` holds defaults for every turn (sampling, max_new_tokens, min_new_tokens, stop,
        response_format, logprobs, tools, tool_choice)."""
        from vlm_core.runtime.chat.session import ChatSession

        return ChatSession(self, system, **generation)

    def ask(self, prompt: str, images=(), system: str | None = None, **kwargs) -> str:
        """Convenience: one user turn (images then text) -> answer text."""
        return self.generate(build_user_messages(prompt, list(images), system), **kwargs).text


__all__ = ["VisionLanguageModel", "GenerationChunk", "GenerationResult"]
