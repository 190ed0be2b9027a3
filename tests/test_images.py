import io

import numpy as np
import pytest
from PIL import Image

from common.image_checks import ImageProblem
from preprocessing.resize import prepare_image, resized_size
from tests.fixtures import SIDE, jpeg_bytes, photo, png_bytes, special_images


def decoded(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


@pytest.fixture(scope="module")
def cases():
    return special_images(np.random.default_rng(5))


@pytest.mark.parametrize("name", ["gray0000000000000", "cmyk0000000000000", "rgbapng0000000000",
                                  "palettepng0000000", "large000000000000", "progressive000000"])
def test_converted_to_rgb_baseline_jpeg_with_exact_short_side(cases, name):
    out, as_is = prepare_image(cases[name][0], SIDE, 90)
    im = decoded(out)
    assert not as_is
    assert im.format == "JPEG" and im.mode == "RGB" and min(im.size) == SIDE
    assert not im.info.get("progressive")


def test_alpha_is_laid_on_white():
    im = Image.new("RGBA", (100, 80), (255, 0, 0, 0))  # fully transparent red
    out, _ = prepare_image(png_bytes(im), SIDE, 95)
    assert np.asarray(decoded(out)).min() > 240


def test_exif_orientation_is_applied():
    arr = np.zeros((80, 120, 3), np.uint8)
    arr[:, :60] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: white half ends on top
    out, _ = prepare_image(jpeg_bytes(Image.fromarray(arr), exif=exif), SIDE, 95)
    im = np.asarray(decoded(out)).astype(int)
    assert im.shape[0] > im.shape[1]  # portrait after rotation
    assert im[: im.shape[0] // 3].mean() > 200 and im[-im.shape[0] // 3:].mean() < 50


def test_right_size_baseline_jpeg_is_packed_byte_for_byte(cases):
    data = cases["resized0000000000"][0]
    out, as_is = prepare_image(data, SIDE, 90)
    assert as_is and out == data


def test_reduced_decode_is_close_to_a_full_decode():
    big = jpeg_bytes(photo(np.random.default_rng(1), 1024, 768))
    fast = np.asarray(decoded(prepare_image(big, SIDE, 95, reduced_decode=True)[0])).astype(float)
    full = np.asarray(decoded(prepare_image(big, SIDE, 95, reduced_decode=False)[0])).astype(float)
    assert fast.shape == full.shape == (SIDE, 85, 3)
    assert np.abs(fast - full).mean() < 4


@pytest.mark.parametrize("name", ["corrupt0000000000", "garbage0000000000", "truncated00000000", "zerobyte000000000",
                                  "notanimage0000000"])
def test_bad_inputs_raise_their_reason(cases, name):
    data, reason = cases[name]
    with pytest.raises(ImageProblem, match=reason):
        prepare_image(data, SIDE, 90)


def test_output_size_is_computed_from_the_original_dimensions():
    """Reduced-scale decoding rounds the intermediate size; the output never inherits that rounding."""
    rng = np.random.default_rng(7)
    for _ in range(40):
        w, h = int(rng.integers(300, 1100)), int(rng.integers(300, 1100))
        exif = Image.Exif()
        rotated = rng.random() < 0.3
        if rotated:
            exif[0x0112] = 6  # displayed turned by 90 degrees: the sides swap
        out = decoded(prepare_image(jpeg_bytes(photo(rng, w, h), exif=exif), SIDE, 90)[0])
        assert out.size == resized_size(*((h, w) if rotated else (w, h)), SIDE), (w, h, rotated)
