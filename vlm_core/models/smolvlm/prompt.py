"""SmolVLM prompt layout: the expansion of each ``<image>`` placeholder into its tile tokens.

Mirrors transformers' SmolVLMProcessor (processing_smolvlm.py, `get_image_prompt_string`) and
ProcessorMixin's `get_text_with_replacements`: after the chat template is rendered (it writes one
``<image>`` per image part), every literal ``<image>`` in the text is replaced, in order, by its image's
expansion:

* an image split into rows x cols tiles: per row, per column
  ``<fake_token_around_image><row_{r}_col_{c}>`` + ``<image>`` * image_seq_len, a ``\\n`` after each row,
  then ``\\n<fake_token_around_image><global-img>`` + ``<image>`` * image_seq_len +
  ``<fake_token_around_image>``;
* an image that is one tile (rows = cols = 0):
  ``<fake_token_around_image><global-img>`` + ``<image>`` * image_seq_len + ``<fake_token_around_image>``.

Tokenizing: the expanded text is encoded with no special tokens added. (processor.apply_chat_template(...,
tokenize=True) passes add_special_tokens=False when the text starts with the tokenizer's BOS, which SmolVLM's
template writes itself as ``<|im_start|>``; SmolVLM's tokenizer has no BOS/EOS post-processor either.)

Serve-time module: no dependencies.
"""
from __future__ import annotations

FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"


def image_prompt_string(rows: int, cols: int, image_seq_len: int, fake: str = FAKE_IMAGE_TOKEN,
                        image: str = IMAGE_TOKEN, global_image: str = GLOBAL_IMAGE_TOKEN) -> str:
    """The text one image's placeholder becomes (transformers' get_image_prompt_string)."""
    tokens = image * image_seq_len
    global_part = f"{fake}{global_image}{tokens}{fake}"
    if rows == 0 and cols == 0:
        return global_part
    text = ""
    for r in range(rows):
        for c in range(cols):
            text += f"{fake}<row_{r + 1}_col_{c + 1}>{tokens}"
        text += "\n"
    return text + "\n" + global_part


def expand_images(text: str, rows_cols, image_seq_len: int, fake: str = FAKE_IMAGE_TOKEN,
                  image: str = IMAGE_TOKEN, global_image: str = GLOBAL_IMAGE_TOKEN) -> str:
    """Replace each `image` placeholder of a rendered chat text, in order, by its image's expansion.

    rows_cols: one (rows, cols) per image (e.g. preprocess_images' int64 [n, 2]).
    Raises ValueError when the number of placeholders differs from the number of images.
    """
    pairs = [(int(r), int(c)) for r, c in rows_cols]
    pieces = text.split(image)
    if len(pieces) - 1 != len(pairs):
        raise ValueError(f"the prompt has {len(pieces) - 1} {image} placeholder(s) but {len(pairs)} image(s) "
                         "were given")
    out = [pieces[0]]
    for (rows, cols), rest in zip(pairs, pieces[1:]):
        out.append(image_prompt_string(rows, cols, image_seq_len, fake, image, global_image))
        out.append(rest)
    return "".join(out)
