"""Where the model input sits in the original image, and how a CAM computed
on the model input is placed back into the full image frame.

Preprocessing usually resizes and centre-crops, so the model sees only a
window of the image. :func:`input_window` finds that window: exactly for
torchvision's resize/crop transforms and the weights' presets, and for any
other callable by probing it with coordinate-ramp images. :func:`to_frame`
resamples maps into the full frame on the maps' device, zero outside the
window.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class TransformError(ValueError):
    """The preprocessing cannot be mapped back onto the image."""


@dataclass(frozen=True)
class Window:
    """The rectangle of the original image covered by the model input, in
    pixel-edge coordinates of the original image (it may extend beyond the
    image when the transform pads)."""

    x0: float
    y0: float
    x1: float
    y1: float

    def as_tuple(self):
        return (self.x0, self.y0, self.x1, self.y1)

    def scaled(self, sx, sy):
        return Window(self.x0 * sx, self.y0 * sy, self.x1 * sx, self.y1 * sy)


# Transforms that never move pixels
_PHOTOMETRIC = {
    "ToTensor",
    "PILToTensor",
    "Normalize",
    "ConvertImageDtype",
    "ToImage",
    "ToImageTensor",
    "ToDtype",
    "ToPureTensor",
    "ConvertImageToTensor",
    "Grayscale",
}


class _Affine:
    """Maps current-image pixel coordinates back to the original image:
    ``orig = scale * cur + offset`` per axis."""

    def __init__(self, width, height):
        self.w, self.h = width, height
        self.sx, self.sy = 1.0, 1.0
        self.ox, self.oy = 0.0, 0.0

    def resize(self, new_w, new_h):
        self.sx *= self.w / new_w
        self.sy *= self.h / new_h
        self.w, self.h = new_w, new_h

    def shift(self, left, top, new_w, new_h):
        # the new image's pixel 0 is the old image's pixel (left, top)
        self.ox += self.sx * left
        self.oy += self.sy * top
        self.w, self.h = new_w, new_h

    def window(self):
        return Window(
            self.ox, self.oy, self.ox + self.sx * self.w, self.oy + self.sy * self.h
        )


def _as_size(size):
    if isinstance(size, int):
        return [size]
    if size is None:
        return None
    return list(size)


def _resized_size(w, h, size, max_size=None):
    """torchvision's resize rule: an int resizes the shorter side, keeping the
    aspect ratio (truncating the longer side), a pair gives (h, w)."""
    size = _as_size(size)
    if size is not None and len(size) == 2:
        return size[1], size[0]

    short, long = (w, h) if w <= h else (h, w)
    if size is None:
        if max_size is None:
            raise TransformError("Resize without size or max_size")
        new_short, new_long = int(max_size * short / long), max_size
    else:
        new_short, new_long = size[0], int(size[0] * long / short)
        if max_size is not None and new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size

    return (new_short, new_long) if w <= h else (new_long, new_short)


def _center_crop(affine, size):
    size = _as_size(size)
    ch, cw = (size[0], size[0]) if len(size) == 1 else (size[0], size[1])
    w, h = affine.w, affine.h
    if cw > w or ch > h:
        left = (cw - w) // 2 if cw > w else 0
        top = (ch - h) // 2 if ch > h else 0
        right = (cw - w + 1) // 2 if cw > w else 0
        bottom = (ch - h + 1) // 2 if ch > h else 0
        affine.shift(-left, -top, w + left + right, h + top + bottom)
        w, h = affine.w, affine.h
        if w == cw and h == ch:
            return

    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    affine.shift(left, top, cw, ch)


def _apply_known(transform, affine):
    """Applies a known transform's geometry; returns False if unknown."""
    name = type(transform).__name__
    if name in _PHOTOMETRIC:
        return True

    inner = getattr(transform, "transforms", None)
    if name in ("Compose", "Sequential") or (
        isinstance(inner, (list, tuple)) and name.endswith("Compose")
    ):
        items = inner if inner is not None else list(transform)
        return all(_apply_known(t, affine) for t in items)

    if isinstance(transform, torch.nn.Sequential):
        return all(_apply_known(t, affine) for t in transform)

    if name == "ImageClassification" and hasattr(transform, "crop_size"):
        new_w, new_h = _resized_size(affine.w, affine.h, transform.resize_size)
        affine.resize(new_w, new_h)
        _center_crop(affine, transform.crop_size)
        return True

    if name == "Resize" and hasattr(transform, "size"):
        new_w, new_h = _resized_size(
            affine.w, affine.h, transform.size, getattr(transform, "max_size", None)
        )
        affine.resize(new_w, new_h)
        return True

    if name == "CenterCrop" and hasattr(transform, "size"):
        _center_crop(affine, transform.size)
        return True

    # a crop that states its own box, of the image it is given, as
    # (left, top, width, height); outside the image it pads
    crop_box = getattr(transform, "crop_box", None)
    if callable(crop_box):
        left, top, new_w, new_h = crop_box(int(round(affine.w)), int(round(affine.h)))
        affine.shift(left, top, new_w, new_h)
        return True

    return False


def input_window(transform, width, height, output_hw=None):
    """Returns the :class:`Window` of a ``width`` x ``height`` image that the
    transform's output covers.

    Args:
        transform: the preprocessing callable (PIL image -> CHW tensor)
        width, height: the original image size
        output_hw (None): the (H, W) of the transform's output, used to
            check the analytic result

    Raises:
        TransformError: if the transform is random or not an axis-aligned
            resize/crop/pad
    """
    affine = _Affine(width, height)
    if _apply_known(transform, affine):
        if output_hw is None or (affine.h, affine.w) == tuple(output_hw):
            return affine.window()

    return probe_window(transform, width, height)


def probe_window(transform, width, height):
    """Finds the window of an arbitrary transform by feeding it images whose
    red and green channels ramp with x and y, and fitting the affine map from
    output pixels back to input coordinates.

    Three probes (the ramps, all black, all white) cancel any per-channel
    normalisation; pixels that the all-white probe shows as padding are left
    out of the fit.
    """
    xs = (np.arange(width) + 0.5) / width
    ys = (np.arange(height) + 0.5) / height
    ramp = np.zeros((height, width, 3), dtype=np.float64)
    ramp[:, :, 0] = xs[None, :] * 255.0
    ramp[:, :, 1] = ys[:, None] * 255.0
    ramp[:, :, 2] = 128.0

    def run(array):
        out = transform(Image.fromarray(np.round(array).astype(np.uint8), "RGB"))
        out = torch.as_tensor(out).detach().double().cpu()
        if out.ndim != 3 or out.shape[0] < 2:
            raise TransformError(
                f"The transform returned a tensor of shape {tuple(out.shape)}; "
                "expected (channels, height, width)"
            )
        return out

    black = run(np.zeros_like(ramp))
    white = run(np.full_like(ramp, 255.0))
    probe = run(ramp)
    if not torch.equal(run(ramp), probe):
        raise TransformError(
            "The transform is not deterministic (random crops or flips?), so "
            "its maps cannot be placed back on the image; use an evaluation "
            "transform"
        )

    span = white - black
    if torch.any(span[:2].abs() < 1e-9):
        inside = (span[:2].abs() > 1e-6).all(dim=0)
    else:
        inside = torch.ones(span.shape[1:], dtype=torch.bool)

    if inside.sum() < 4:
        raise TransformError("The transform's output does not show the image")

    values = (probe[:2] - black[:2]) / span[:2].clamp_min(1e-9) * 255.0
    out_h, out_w = probe.shape[1:]
    # interior pixels only: resampling filters blur the ramps' ends
    margin = torch.zeros_like(inside)
    my, mx = max(1, out_h // 16), max(1, out_w // 16)
    margin[my : out_h - my, mx : out_w - mx] = True
    use = inside & margin if (inside & margin).sum() >= 4 else inside

    us = (torch.arange(out_w, dtype=torch.float64) + 0.5)[None, :].expand(out_h, out_w)
    vs = (torch.arange(out_h, dtype=torch.float64) + 0.5)[:, None].expand(out_h, out_w)
    x_in = values[0] / 255.0 * width
    y_in = values[1] / 255.0 * height

    sx, ox, err_x = _fit_line(us[use], x_in[use])
    sy, oy, err_y = _fit_line(vs[use], y_in[use])

    # 8-bit ramps quantise coordinates to width/255 pixels
    tol_x = 2.0 + width / 255.0
    tol_y = 2.0 + height / 255.0
    if err_x > tol_x or err_y > tol_y or sx <= 0 or sy <= 0:
        raise TransformError(
            "The transform is not an axis-aligned resize/crop/pad (rotation, "
            "flip or warp?), so its maps cannot be placed back on the image"
        )

    return Window(ox, oy, ox + sx * out_w, oy + sy * out_h)


def _fit_line(u, x):
    a = torch.stack([u, torch.ones_like(u)], dim=1)
    sol = torch.linalg.lstsq(a, x[:, None]).solution[:, 0]
    residual = (a @ sol - x).abs().max().item()
    return sol[0].item(), sol[1].item(), residual


def frame_size(width, height, max_side):
    """The heatmap resolution for an image: its own size, scaled down so the
    longer side is at most ``max_side``, keeping the aspect ratio."""
    if max_side is None or max(width, height) <= max_side:
        return int(width), int(height)

    scale = max_side / max(width, height)
    return max(1, int(round(width * scale))), max(1, int(round(height * scale)))


def to_frame(maps, windows, image_sizes, out_sizes):
    """Resamples maps covering model inputs into the full image frame, all
    samples in one batched resampling (whatever their sizes).

    Args:
        maps: (N, h, w) maps on any device, each covering its sample's
            model input
        windows: (N, 4) windows (x0, y0, x1, y1) in original pixels
        image_sizes: the (width, height) of the original image, one for all
            or one per sample
        out_sizes: the (width, height) of each output frame, one for all or
            one per sample

    Returns:
        (N, max out_h, max out_w) float32 maps: sample ``i`` fills the top
        left ``out_h_i x out_w_i`` corner, bilinear inside its window (edge
        values held at its border, as a plain resize would), zero outside
        the window and beyond its own size
    """
    n = maps.shape[0]
    device = maps.device
    win = torch.as_tensor(windows, dtype=torch.float32, device=device).reshape(n, 4)
    sizes = torch.as_tensor(image_sizes, dtype=torch.float32, device=device).reshape(-1, 2)
    outs = torch.as_tensor(out_sizes, dtype=torch.float32, device=device).reshape(-1, 2)
    sizes, outs = sizes.expand(n, 2), outs.expand(n, 2)
    out_w, out_h = int(outs[:, 0].max()), int(outs[:, 1].max())

    # output pixel centres in original-image coordinates, per sample
    cols = torch.arange(out_w, device=device, dtype=torch.float32) + 0.5
    rows = torch.arange(out_h, device=device, dtype=torch.float32) + 0.5
    px = cols[None, :] * (sizes[:, 0:1] / outs[:, 0:1])
    py = rows[None, :] * (sizes[:, 1:2] / outs[:, 1:2])
    gx = 2 * (px - win[:, 0:1]) / (win[:, 2:3] - win[:, 0:1]) - 1
    gy = 2 * (py - win[:, 1:2]) / (win[:, 3:4] - win[:, 1:2]) - 1
    # columns and rows past a sample's own size fall outside its window
    gx = torch.where(cols[None, :] < outs[:, 0:1], gx, torch.full_like(gx, 2.0))
    gy = torch.where(rows[None, :] < outs[:, 1:2], gy, torch.full_like(gy, 2.0))

    grid = torch.stack(
        [gx[:, None, :].expand(n, out_h, out_w), gy[:, :, None].expand(n, out_h, out_w)],
        dim=-1,
    )
    out = F.grid_sample(
        maps[:, None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )[:, 0]
    inside = (grid.abs() <= 1).all(dim=-1)
    return out * inside
