"""Image files: which names count as images, reading any mode as RGB, and the per-file check of the scan.

Reading applies the EXIF orientation and converts every PIL mode to RGB without losing information
that a plain `convert("RGB")` loses: transparent pixels go on white (not black), 16-bit and 32-bit
grey values are scaled to 0-255 (PIL's conversion clips them at 255).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from transferlab.config.schema import PIL_MAX_PIXELS
from transferlab.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_JPEG_END = b"\xff\xd9"  # the EOI marker: a JPEG cut short (interrupted copy or download) lacks it


def is_image_name(name: str) -> bool:
    """Hidden files (`.DS_Store`, macOS `._x.jpg`) and other extensions are not images."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


EMPTY_IMAGE = "empty file (0 bytes)"  # the scan's and predict's word for it


def set_pixel_limit(max_pixels: int) -> None:
    """PIL refuses (DecompressionBombError) images over twice this many pixels and warns above it.

    PIL has no per-call limit, only this module-level one; every reader of ours sets the same value.
    """
    Image.MAX_IMAGE_PIXELS = int(max_pixels)


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


def _scale_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit (I;16*) and 32-bit integer (I) grey: 0-65535 to 0-255; float (F): 0-1 (or 0-255) to 0-255."""
    values = np.asarray(image).astype(np.float64)
    scale = 255.0 / 65535.0  # PIL opens 16-bit greyscale PNG and TIFF as I;16 or I
    if image.mode == "F":
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
    return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: EXIF orientation applied, alpha composited on white, bit depth scaled."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        image = _scale_to_8bit(image)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGB


def load_rgb(path: str | os.PathLike, max_pixels: int = PIL_MAX_PIXELS) -> Image.Image:
    """Read one file as RGB; any failure is a DataError naming the file (it passed the scan at start)."""
    set_pixel_limit(max_pixels)
    try:
        with Image.open(path) as image:
            return to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(
            f"{path}: cannot be read as an image ({type(err).__name__}: {err}). It passed the scan before "
            "training, so it changed since, or its damage needs a full decode to show: remove or replace it "
            "(`transferlab check ... data.scan=full` finds every such file)."
        ) from err


@dataclass(frozen=True)
class ImageCheck:
    """What the scan learned about one file: its header (size, mode) or the problem that makes it unusable."""

    path: Path
    width: int = 0
    height: int = 0
    mode: str = ""
    problem: str | None = None


def _jpeg_ends_cleanly(image: Image.Image) -> bool:
    """Read the last bytes through the already open file: no second open."""
    image.fp.seek(0, os.SEEK_END)
    image.fp.seek(max(0, image.fp.tell() - 64))
    return _JPEG_END in image.fp.read()


def _decode_fully(path: Path) -> None:
    with Image.open(path) as image:
        to_rgb(image)  # what the dataset will do with it


def check_image(path: Path, full: bool = False, max_pixels: int = PIL_MAX_PIXELS) -> ImageCheck:
    """Header-only check of one file (decode everything with `full=True`); never raises.

    Fast mode reads the header, runs PIL's `verify()` (PNG: every chunk's CRC up to the end, so a
    truncated PNG fails) and decodes only where decoding costs no more than reading: uncompressed
    formats (BMP, PPM/PGM, raw TIFF). JPEG's `verify()` checks nothing, so a JPEG is decoded only when
    its end marker is missing, which separates a cut file from one with trailing bytes after the image.
    Compressed TIFF is not decoded in fast mode; `full=True` catches damage there too.
    """
    set_pixel_limit(max_pixels)
    try:
        with Image.open(path) as image:
            width, height = image.size
            mode = image.mode
            if problem := too_large(width, height, max_pixels):
                return ImageCheck(path, width, height, mode, problem)
            decode = full or (bool(image.tile) and all(tile[0] == "raw" for tile in image.tile))
            decode = decode or (image.format == "JPEG" and not _jpeg_ends_cleanly(image))
            image.verify()
        if decode:
            _decode_fully(path)
    except Image.DecompressionBombError as err:
        return ImageCheck(path, problem=refused_by_pil(err, max_pixels))
    except UnidentifiedImageError:
        empty = os.path.getsize(path) == 0
        return ImageCheck(path, problem=EMPTY_IMAGE if empty else "not an image (PIL cannot identify it)")
    except (PermissionError, FileNotFoundError) as err:  # unreadable, vanished, or a broken link
        return ImageCheck(path, problem=f"cannot be opened ({err.strerror})")
    except (OSError, ValueError, SyntaxError, EOFError) as err:  # what PIL raises on damaged files
        return ImageCheck(path, problem=f"damaged or truncated ({type(err).__name__}: {err})")
    return ImageCheck(path, width, height, mode)


def too_large(width: int, height: int, max_pixels: int, key: str = "data.max_image_pixels") -> str | None:
    """Why an image of this size is refused from its header (None: it is not): over `max_pixels`, the
    value of setting `key`. PIL itself refuses only above twice its limit (`refused_by_pil`)."""
    if width * height <= max_pixels:
        return None
    return _too_large(f"{width}x{height} = {width * height} pixels", max_pixels, key)


def refused_by_pil(
    err: Image.DecompressionBombError, max_pixels: int, key: str = "data.max_image_pixels"
) -> str:
    """PIL's own refusal, raised when the file is opened (above twice its limit), before `too_large` can
    read the size: the same message, with the user's limit (PIL's names twice it)."""
    found = re.search(r"\((\d+) pixels\)", str(err))
    return _too_large(f"{found[1]} pixels" if found else "over twice the limit", max_pixels, key)


def _too_large(size: str, max_pixels: int, key: str) -> str:
    return f"too large ({size} > {key}={max_pixels}); raise {key} if you trust the file"
