"""Painting over an image's labelled region, or over everything else: the
images of a background-intervention test (:mod:`cam_plugin.runs.reliance`).

An image and a region (a boolean mask of the image's size) give two edited
images: the *background removed* (every pixel outside the region replaced
by the fill) and the *object removed* (every pixel inside it replaced). The
fill is an image of the same size:

-   ``"mean"``: the ImageNet mean colour, (124, 116, 104): what a normalised
    model sees as zero, the least informative colour
-   ``"blur"``: the image under a strong Gaussian blur (radius a tenth of
    its shorter side): colours and layout stay, shapes and textures go
-   ``"swap"``: another image's background (its own region painted with the
    mean colour), resized: the ImageNet-9 backgrounds challenge's
    *Mixed-Rand* (Xiao et al., 2020), where the object is shown on the
    background of a random image of another class
"""

import numpy as np
from PIL import Image, ImageFilter

#: the ImageNet mean colour, (0.485, 0.456, 0.406) in 8-bit levels
MEAN_COLOUR = (124, 116, 104)
FILLS = ("mean", "blur", "swap")


class InterventionError(ValueError):
    """An intervention that cannot be made as asked."""


def check_fill(fill):
    if fill not in FILLS:
        raise InterventionError(f"fill must be one of {', '.join(map(repr, FILLS))}, not {fill!r}")
    return fill


def blur_radius(size):
    """The Gaussian blur's radius for an image of ``size`` (width, height):
    a tenth of its shorter side, at least 2 pixels."""
    return max(2.0, min(size) / 10)


def fill_image(image, fill, background=None):
    """The replacement pixels for ``image`` (an RGB PIL image).

    Args:
        image: the image
        fill: one of :data:`FILLS`
        background: for ``"swap"``, the other image's background (see
            :func:`swap_background`), resized here to the image's size

    Returns:
        an RGB PIL image of the image's size
    """
    check_fill(fill)
    if fill == "mean":
        return Image.new("RGB", image.size, MEAN_COLOUR)
    if fill == "blur":
        return image.filter(ImageFilter.GaussianBlur(radius=blur_radius(image.size)))
    if background is None:
        raise InterventionError("fill='swap' needs another image's background")
    return background.convert("RGB").resize(image.size, Image.BILINEAR)


def swap_background(image, region):
    """An image's background for another image's ``"swap"`` fill: its own
    region painted with the mean colour, so none of its object is carried
    over."""
    return paint(image, region, Image.new("RGB", image.size, MEAN_COLOUR))


def paint(image, where, fill):
    """``image`` with the pixels where ``where`` (an (H, W) bool array of the
    image's size) is True taken from ``fill``."""
    where = np.asarray(where, dtype=bool)
    if where.shape != (image.size[1], image.size[0]):
        raise InterventionError(
            f"a region of shape {where.shape} for an image of {image.size[0]}x{image.size[1]}"
        )
    pixels = np.asarray(image.convert("RGB"))
    replaced = np.where(where[:, :, None], np.asarray(fill), pixels)
    return Image.fromarray(replaced.astype(np.uint8), "RGB")


def interventions(image, region, fill_img):
    """The image, its background removed and its object removed.

    Args:
        image: an RGB PIL image
        region: an (H, W) bool array of the image's size, True on the object
        fill_img: the replacement pixels (:func:`fill_image`)

    Returns:
        ``[image, background removed, object removed]``
    """
    region = np.asarray(region, dtype=bool)
    return [image, paint(image, ~region, fill_img), paint(image, region, fill_img)]
