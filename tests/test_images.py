"""Reading image files: every PIL mode becomes the right RGB values, EXIF orientation is applied."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from transferlab.data.images import is_image_name, load_rgb


def saved(tmp_path, image: Image.Image, name: str, **kwargs) -> np.ndarray:
    """Save to a real file, read it back with load_rgb, return the (H, W, 3) uint8 pixels."""
    path = tmp_path / name
    image.save(path, **kwargs)
    rgb = load_rgb(path)
    assert rgb.mode == "RGB"
    return np.asarray(rgb)


def test_alpha_is_composited_on_white_not_black(tmp_path):
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red: white
    rgba.putpixel((1, 0), (255, 0, 0, 255))  # opaque red
    rgba.putpixel((2, 0), (0, 0, 255, 128))  # half-transparent blue on white
    pixels = saved(tmp_path, rgba, "rgba.png")[0]
    assert pixels[0].tolist() == [255, 255, 255]
    assert pixels[1].tolist() == [255, 0, 0]
    assert pixels[2].tolist() == pytest.approx([127, 127, 255], abs=1)


def test_grey_with_alpha_and_palette_with_transparency(tmp_path):
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (0, 0))
    la.putpixel((1, 0), (100, 255))
    assert saved(tmp_path, la, "la.png")[0].tolist() == [[255, 255, 255], [100, 100, 100]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # index 0 is transparent
    assert saved(tmp_path, palette, "p.png")[0].tolist() == [[255, 255, 255], [200, 100, 50]]


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 30000, 65535]], dtype=np.uint16)
    expected = [0, 100, round(30000 / 257), 255]
    for name in ("grey16.png", "grey16.tif"):
        image = Image.fromarray(values)
        assert image.mode == "I;16"
        pixels = saved(tmp_path, image, name)[0]
        assert pixels[:, 0].tolist() == expected and (pixels[:, 0] == pixels[:, 2]).all()
    # 16-bit PGM opens in PIL's 32-bit mode I: the same 16-bit range
    pgm = tmp_path / "grey16.pgm"
    pgm.write_bytes(b"P5 4 1 65535\n" + values.astype(">u2").tobytes())
    with Image.open(pgm) as image:
        assert image.mode.startswith("I")
    assert np.asarray(load_rgb(pgm))[0, :, 0].tolist() == expected


def test_bilevel_grey_and_cmyk(tmp_path):
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    assert saved(tmp_path, bilevel, "one.png")[0].tolist() == [[0, 0, 0], [255, 255, 255]]
    grey = Image.new("L", (1, 1), 77)
    assert saved(tmp_path, grey, "l.png")[0].tolist() == [[77, 77, 77]]
    cmyk = Image.new("CMYK", (2, 1), (0, 255, 255, 0))  # red
    cmyk.putpixel((1, 0), (0, 0, 0, 255))  # black
    assert saved(tmp_path, cmyk, "cmyk.tif")[0].tolist() == [[255, 0, 0], [0, 0, 0]]


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (4, 2), (0, 0, 0))
    image.putpixel((0, 0), (255, 255, 255))  # top-left, stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    pixels = saved(tmp_path, image, "rotated.png", exif=exif)
    assert pixels.shape == (4, 2, 3)  # displayed upright: 2 wide, 4 high
    assert pixels[0, 1].tolist() == [255, 255, 255]  # the stored top-left is now top-right


def test_which_names_are_images():
    assert is_image_name("a.JPG") and is_image_name("b.webp") and is_image_name("c.tiff")
    assert not is_image_name(".hidden.jpg") and not is_image_name("._mac.jpg")
    assert not is_image_name("notes.txt") and not is_image_name("image.jpg.part")
