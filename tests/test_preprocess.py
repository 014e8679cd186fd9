"""Qwen3-VL image preprocessing vs transformers' own image processor.

Reference: `Qwen2VLImageProcessorPil`, the class `AutoProcessor` gives Qwen3-VL checkpoints when
torchvision is absent (checked in `test_auto_image_processor_is_the_pil_backend`). Our pipeline
makes the same Pillow calls on the same uint8 pixels and the same float64 -> float32 rescale and
float32 normalize, so `pixel_values` must be bit-identical: the comparisons are exact
(`assert_array_equal`), not approximate. Any drift (a different filter, a float32 rescale, an
alpha composite where transformers drops alpha) would show up as a mismatch here.
"""

from __future__ import annotations

import io
import pathlib
import warnings

import numpy as np
import pytest
from PIL import Image

from vlm_core.kernels.image import ImageError, load_image, smart_resize
from vlm_core.models.qwen3_vl.preprocess import (
    ImageProcessorParams,
    num_image_tokens,
    preprocess_images,
)

transformers = pytest.importorskip("transformers")
skimage_data = pytest.importorskip("skimage.data")

# Qwen3-VL-2B-Instruct's preprocessor_config.json
QWEN3_VL_CONFIG = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}
CONFIGS = {"qwen3_vl": QWEN3_VL_CONFIG, "default": {}}


def reference_processor(config: dict):
    from transformers import Qwen2VLImageProcessorPil

    kwargs = {k: v for k, v in config.items() if k not in ("processor_class", "image_processor_type")}
    return Qwen2VLImageProcessorPil(**kwargs)


def reference(images, config: dict, **call_kwargs):
    """transformers' (pixel_values, image_grid_thw) as numpy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = reference_processor(config)(images=images, return_tensors="np", **call_kwargs)
    return np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])


def ours(images, config: dict, **overrides):
    return preprocess_images(images, ImageProcessorParams.from_dict(config), **overrides)


def assert_same(images, config: dict, ref_images=None, ref_kwargs=None, **overrides):
    """Ours on `images` equals transformers on `ref_images` (default: the same inputs), exactly."""
    pixel_values, grid = ours(images, config, **overrides)
    ref_pixels, ref_grid = reference(images if ref_images is None else ref_images, config, **(ref_kwargs or {}))
    assert pixel_values.dtype == np.float32 and grid.dtype == np.int64
    np.testing.assert_array_equal(grid, ref_grid)
    assert pixel_values.shape == ref_pixels.shape
    np.testing.assert_array_equal(pixel_values, ref_pixels)
    return pixel_values, grid


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> pathlib.Path:
    """Real photographs from scikit-image saved as JPEG and PNG, plus edge-case files."""
    d = tmp_path_factory.mktemp("photos")
    Image.fromarray(skimage_data.astronaut()).save(d / "astronaut.jpg", quality=90)
    Image.fromarray(skimage_data.coffee()).save(d / "coffee.png")
    Image.fromarray(skimage_data.chelsea()).save(d / "chelsea.jpg")
    Image.fromarray(skimage_data.rocket()).save(d / "rocket.png")
    Image.fromarray(skimage_data.camera()).save(d / "camera_grey.png")  # mode L
    Image.fromarray(skimage_data.logo()).save(d / "logo_rgba.png")  # real RGBA with transparency
    return d


PHOTOS = ["astronaut.jpg", "coffee.png", "chelsea.jpg", "rocket.png"]


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_photographs_batch(photo_dir, config_name):
    paths = [str(photo_dir / name) for name in PHOTOS]
    pixel_values, grid = assert_same(paths, CONFIGS[config_name])
    assert len(grid) == len(PHOTOS) and pixel_values.shape[0] == grid.prod(axis=1).sum()


def test_photographs_as_pil_objects(photo_dir):
    images = [Image.open(photo_dir / name) for name in PHOTOS]
    assert_same(images, QWEN3_VL_CONFIG)


def test_single_image_not_in_a_list(photo_dir):
    path = str(photo_dir / "chelsea.jpg")
    pixel_values, grid = ours(path, QWEN3_VL_CONFIG)
    ref_pixels, ref_grid = reference([path], QWEN3_VL_CONFIG)
    np.testing.assert_array_equal(grid, ref_grid)
    np.testing.assert_array_equal(pixel_values, ref_pixels)


def test_bytes_and_pathlike_match_path(photo_dir):
    path = photo_dir / "astronaut.jpg"
    assert_same([path.read_bytes()], QWEN3_VL_CONFIG, ref_images=[str(path)])
    assert_same([path], QWEN3_VL_CONFIG, ref_images=[str(path)])


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_tiny_image_is_upscaled_to_min_pixels(config_name):
    tiny = Image.fromarray(np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8))
    _, grid = assert_same([tiny], CONFIGS[config_name])
    params = ImageProcessorParams.from_dict(CONFIGS[config_name])
    assert grid[0].prod() * params.patch_size**2 >= params.min_pixels


def test_huge_image_is_downscaled_to_max_pixels():
    # 4200 x 4100 = 17.2 M pixels, over Qwen3-VL's 16,777,216 cap.
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (105, 103, 3), dtype=np.uint8)
    huge = Image.fromarray(small).resize((4100, 4200), Image.Resampling.BILINEAR)
    _, grid = assert_same([huge], QWEN3_VL_CONFIG)
    assert grid[0].prod() * 16 * 16 <= QWEN3_VL_CONFIG["size"]["longest_edge"]


def test_default_config_downscales_large_photo():
    large = Image.fromarray(skimage_data.astronaut()).resize((1600, 1300))  # 2.1 M > 1,003,520
    _, grid = assert_same([large], {})
    assert grid[0].prod() * 14 * 14 <= 28 * 28 * 1280


def test_min_max_pixel_overrides_match_size_kwarg(photo_dir):
    paths = [str(photo_dir / name) for name in PHOTOS]
    size = {"shortest_edge": 200_000, "longest_edge": 250_000}
    _, grid = assert_same(
        paths, QWEN3_VL_CONFIG, ref_kwargs={"size": size}, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"]
    )
    assert np.all(grid.prod(axis=1) * 256 <= 250_000)


@pytest.mark.parametrize("height, width", [(30, 900), (900, 30), (4, 800)])
def test_extreme_aspect_ratios(height, width):
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (height, width, 3), dtype=np.uint8))
    assert_same([image], QWEN3_VL_CONFIG)


def test_aspect_ratio_over_200_is_rejected_like_transformers(tmp_path):
    path = tmp_path / "sliver.png"
    Image.new("RGB", (900, 3), (10, 20, 30)).save(path)
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
        reference([str(path)], QWEN3_VL_CONFIG)
    with pytest.raises(ImageError, match="aspect ratio must be smaller than 200") as info:
        ours([str(path)], QWEN3_VL_CONFIG)
    assert "sliver.png" in str(info.value) and "\n" not in str(info.value)


def test_greyscale(photo_dir):
    path = photo_dir / "camera_grey.png"
    assert Image.open(path).mode == "L"
    assert_same([str(path)], QWEN3_VL_CONFIG)
    assert_same([Image.open(path)], QWEN3_VL_CONFIG)


def test_greyscale_with_alpha():
    rng = np.random.default_rng(3)
    la = Image.fromarray(rng.integers(0, 256, (70, 90, 2), dtype=np.uint8), mode="LA")
    assert_same([la], QWEN3_VL_CONFIG)


def test_rgba_photo(photo_dir):
    path = photo_dir / "logo_rgba.png"
    assert Image.open(path).mode == "RGBA"
    assert_same([str(path)], QWEN3_VL_CONFIG)
    assert_same([Image.open(path)], QWEN3_VL_CONFIG)


def test_rgba_path_drops_alpha_and_pil_object_composites_on_white(tmp_path):
    rng = np.random.default_rng(4)
    rgba = rng.integers(0, 256, (120, 160, 4), dtype=np.uint8)
    rgba[:40, :, 3] = 0  # fully transparent band over random colours
    path = tmp_path / "band.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    from_path, _ = assert_same([str(path)], QWEN3_VL_CONFIG)
    from_object, _ = assert_same([Image.open(path)], QWEN3_VL_CONFIG)
    # transformers' two routes really differ here (path: alpha dropped; object: white); we follow each.
    assert not np.array_equal(from_path, from_object)
    assert np.all(np.asarray(load_image(Image.open(path)))[:40] == 255)
    np.testing.assert_array_equal(np.asarray(load_image(str(path))), rgba[..., :3])


def test_palette_images(tmp_path):
    rgb = Image.fromarray(skimage_data.chelsea())
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    plain, keyed = tmp_path / "palette.png", tmp_path / "palette_transparent.png"
    palette.save(plain)
    palette.save(keyed, transparency=int(np.asarray(palette)[0, 0]))
    for path in (plain, keyed):
        assert Image.open(path).mode == "P"
        assert_same([str(path)], QWEN3_VL_CONFIG)
        assert_same([Image.open(path)], QWEN3_VL_CONFIG)


def test_16_bit_png(tmp_path):
    ramp = np.linspace(0, 65535, 150 * 200).reshape(150, 200).astype(np.uint16)
    path = tmp_path / "sixteen.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    assert_same([str(path)], QWEN3_VL_CONFIG)
    assert_same([Image.open(path)], QWEN3_VL_CONFIG)


def test_32_bit_integer_mode():
    values = np.linspace(-1000, 70000, 90 * 110).reshape(90, 110).astype(np.int32)
    image = Image.fromarray(values, mode="I")
    assert_same([image], QWEN3_VL_CONFIG)


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(skimage_data.rocket()).convert("CMYK").save(path)
    assert_same([str(path)], QWEN3_VL_CONFIG)


def test_exif_rotated_jpeg(tmp_path):
    coffee = Image.fromarray(skimage_data.coffee())  # 600 wide x 400 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    path = tmp_path / "rotated.jpg"
    coffee.save(path, exif=exif.tobytes())
    _, grid = assert_same([str(path)], QWEN3_VL_CONFIG)
    assert grid[0, 1] > grid[0, 2]  # upright: taller than wide
    assert load_image(str(path)).size == (400, 600)
    # A PIL object is taken as is by transformers' processor: no EXIF rotation.
    _, grid_object = assert_same([Image.open(path)], QWEN3_VL_CONFIG)
    assert grid_object[0, 1] < grid_object[0, 2]


def test_no_resize_rescale_normalize_flags():
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    config = dict(QWEN3_VL_CONFIG, do_resize=False, do_normalize=False)
    assert_same([image], config)
    config = dict(QWEN3_VL_CONFIG, do_rescale=False)
    assert_same([image], config)


def test_patch_layout_is_spatial_merge_blocks():
    # Pixel value = its own row index: a patch's contents tell where it came from.
    rows = np.repeat(np.arange(64, dtype=np.uint8)[:, None], 64, axis=1)
    image = Image.fromarray(np.stack([rows] * 3, axis=-1))
    config = dict(QWEN3_VL_CONFIG, do_resize=False, do_normalize=False, do_rescale=False)
    pixel_values, grid = ours([image], config)
    assert grid.tolist() == [[1, 4, 4]] and pixel_values.shape == (16, 3 * 2 * 16 * 16)
    patch_rows = pixel_values.reshape(16, 3, 2, 16, 16)[:, 0, 0, 0, 0] // 16
    # first merge block holds patch rows 0,0,1,1 (2x2), then the block to its right
    assert patch_rows.tolist() == [0, 0, 1, 1] * 2 + [2, 2, 3, 3] * 2
    # the temporal copies are identical frames
    frames = pixel_values.reshape(16, 3, 2, 256)
    np.testing.assert_array_equal(frames[:, :, 0], frames[:, :, 1])


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        smart_resize as ref_smart_resize,
    )

    sizes = [1, 2, 5, 7, 15, 16, 17, 31, 32, 33, 47, 48, 49, 100, 255, 256, 300, 451, 640, 1000, 1023, 3333, 5000]
    for factor, min_pixels, max_pixels in [(28, 3136, 1003520), (32, 65536, 16777216), (32, 200_000, 250_000)]:
        for h in sizes:
            for w in sizes:
                if max(h, w) / min(h, w) > 200:
                    with pytest.raises(ValueError):
                        smart_resize(h, w, factor, min_pixels, max_pixels)
                    continue
                expected = ref_smart_resize(h, w, factor, min_pixels, max_pixels)
                assert smart_resize(h, w, factor, min_pixels, max_pixels) == expected, (h, w, factor)


def test_params_from_dict_matches_transformers_attributes():
    for config in CONFIGS.values():
        params = ImageProcessorParams.from_dict(config)
        ref = reference_processor(config)
        assert params.patch_size == ref.patch_size
        assert params.temporal_patch_size == ref.temporal_patch_size
        assert params.merge_size == ref.merge_size
        assert params.image_mean == list(ref.image_mean) and params.image_std == list(ref.image_std)
        assert params.min_pixels == ref.size["shortest_edge"] and params.max_pixels == ref.size["longest_edge"]
        assert params.resample == int(ref.resample) and params.rescale_factor == ref.rescale_factor
        assert (params.do_resize, params.do_rescale, params.do_normalize, params.do_convert_rgb) == (
            ref.do_resize,
            ref.do_rescale,
            ref.do_normalize,
            ref.do_convert_rgb,
        )


def test_params_legacy_keys_unknown_keys_and_round_trip():
    legacy = {"min_pixels": 1000, "max_pixels": 2000, "size": {"shortest_edge": 1, "longest_edge": 2}, "foo": 1}
    params = ImageProcessorParams.from_dict(legacy)
    ref = reference_processor({k: v for k, v in legacy.items() if k != "foo"})
    assert (params.min_pixels, params.max_pixels) == (ref.size["shortest_edge"], ref.size["longest_edge"]) == (1000, 2000)
    qwen2_style = ImageProcessorParams.from_dict({"size": {"min_pixels": 3000, "max_pixels": 4000}})
    assert (qwen2_style.min_pixels, qwen2_style.max_pixels) == (3000, 4000)
    params = ImageProcessorParams.from_dict(QWEN3_VL_CONFIG)
    assert ImageProcessorParams.from_dict(params.to_dict()) == params
    assert params.to_dict()["size"] == QWEN3_VL_CONFIG["size"]


def test_num_image_tokens(photo_dir):
    paths = [str(photo_dir / name) for name in PHOTOS]
    pixel_values, grid = ours(paths, QWEN3_VL_CONFIG)
    tokens = num_image_tokens(grid, merge_size=2)
    ref = reference_processor(QWEN3_VL_CONFIG)
    for path, n in zip(paths, tokens):
        height, width = np.asarray(Image.open(path)).shape[:2]
        assert n == ref.get_number_of_image_patches(height, width) // 4
    assert tokens.sum() * 4 == pixel_values.shape[0]


def test_auto_image_processor_is_the_pil_backend(tmp_path):
    import json

    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        pytest.skip("torchvision installed: AutoImageProcessor picks the torchvision backend")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(QWEN3_VL_CONFIG))
    from transformers import AutoImageProcessor, Qwen2VLImageProcessorPil

    assert type(AutoImageProcessor.from_pretrained(str(tmp_path))) is Qwen2VLImageProcessorPil


# --- errors -------------------------------------------------------------------------------------


def assert_one_line_error(src, name: str, words: str):
    with pytest.raises(ImageError) as info:
        preprocess_images([src], ImageProcessorParams.from_dict(QWEN3_VL_CONFIG))
    message = str(info.value)
    assert name in message and words in message and "\n" not in message, message


def test_missing_file(tmp_path):
    assert_one_line_error(str(tmp_path / "nope.jpg"), "nope.jpg", "not found")


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    assert_one_line_error(str(path), "notes.jpg", "not an image")


def test_truncated_jpeg(tmp_path, photo_dir):
    data = (photo_dir / "astronaut.jpg").read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    assert_one_line_error(str(path), "cut.jpg", "truncated")


def test_truncated_png(tmp_path, photo_dir):
    data = (photo_dir / "coffee.png").read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 3])
    assert_one_line_error(str(path), "cut.png", "truncated")


def test_directory_and_bad_type(tmp_path):
    assert_one_line_error(str(tmp_path), tmp_path.name, "directory")
    with pytest.raises(ImageError, match="unsupported image input"):
        load_image(12345)
    with pytest.raises(ImageError, match="not an image"):
        load_image(io.BytesIO(b"x").getvalue())


def test_serve_time_modules_do_not_import_torch_or_transformers():
    import subprocess
    import sys

    code = (
        "import sys, vlm_core.models.qwen3_vl.preprocess, vlm_core.kernels.image;"
        "bad = [m for m in ('torch', 'transformers', 'torchvision') if m in sys.modules];"
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
