"""Decoding sample images into RGB PIL images the way the App shows them.

EXIF orientation is applied (the App does the same, so heatmaps line up);
grayscale, palette, RGBA, CMYK and 16-bit images become 8-bit RGB; very
large JPEGs are decoded at a reduced DCT scale so a 12000x9000 photo never
needs its full-resolution pixels in memory. Every failure raises
:class:`ImageError` with a message that names the problem.
"""

import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageError(ValueError):
    """An image that cannot be used, with the reason."""


def load_rgb(path, min_side=None):
    """Loads an image as RGB with EXIF orientation applied.

    Args:
        path: the image path
        min_side (None): if given, JPEGs whose shorter side exceeds
            ``4 * min_side`` may be decoded at a reduced scale, keeping the
            shorter side at least ``2 * min_side``

    Returns:
        a tuple ``(image, (width, height))``: the RGB image and the size of
        the full-resolution, orientation-corrected image it represents
    """
    if not os.path.exists(path):
        raise ImageError(f"file not found: {path}")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
            full_w, full_h = img.size
            transposed = _exif_swaps_axes(img)

            if min_side and img.format == "JPEG" and min(full_w, full_h) > 4 * min_side:
                scale = min(full_w, full_h) / (2 * min_side)
                img.draft("RGB", (int(full_w / scale), int(full_h / scale)))

            img.load()
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"not an image file (unrecognised format): {path}") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large to decode safely: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"corrupt or truncated image ({e}): {path}") from None

    size = (full_h, full_w) if transposed else (full_w, full_h)
    return img, size


def _exif_swaps_axes(img):
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:
        return False

    return orientation in (5, 6, 7, 8)


def _to_rgb(img):
    mode = img.mode
    if mode == "RGB":
        return img

    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(img, dtype=np.float64)
        if mode == "F":
            peak = array.max() if array.size else 0.0
            array = array / peak * 255.0 if peak > 0 else array
        elif mode == "I" and array.max(initial=0) <= 255:
            pass
        else:
            array = array / 257.0

        gray = Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8), "L")
        return gray.convert("RGB")

    if mode == "P":
        img = img.convert("RGBA")

    # alpha is dropped: the model sees the colours stored under it
    return img.convert("RGB")


def displayed_size(path):
    """The (width, height) of an image as displayed (EXIF orientation
    applied), read from its header only."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            return (h, w) if _exif_swaps_axes(img) else (w, h)
    except FileNotFoundError:
        raise ImageError(f"file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError(f"cannot read image header ({e}): {path}") from None
