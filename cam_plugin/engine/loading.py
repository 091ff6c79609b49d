"""Decoding and preprocessing sample images in DataLoader workers; a failure
becomes a :class:`SampleError`, never an exception that stops the loader."""

from dataclasses import dataclass, field

import torch

from ..frames import TransformError, input_window
from ..images import ImageError, load_rgb
from .errors import ErrorKind, SampleError


@dataclass
class LoadedSample:
    """A decoded, preprocessed image.

    Attributes:
        index: its position in the input lists
        tensor: the (C, H, W) model input; with variants, the (K, C, H, W)
            inputs of the K images made from it
        size: the full image's (width, height), orientation applied
        window: where the input lies in the full image frame
            (:meth:`cam_plugin.frames.Window.as_tuple`)
        note: what the variants said of how they were made (see
            :class:`Variants`), or None
    """

    index: int
    tensor: torch.Tensor
    size: tuple
    window: tuple
    note: object = None


@dataclass
class Variants:
    """What a ``variants`` callable of :class:`SampleImages` may return
    instead of a plain list: the images and a note that travels with the
    loaded sample (which other image was used, say)."""

    images: list
    note: object = None


class SampleImages(torch.utils.data.Dataset):
    """The images at ``filepaths`` through ``transforms``; item ``i`` is a
    :class:`LoadedSample` or a :class:`SampleError`.

    ``variants`` (optional) makes several inputs of each image, decoded
    once: a callable ``(index, image) -> [PIL images]`` of the image's size
    (the image itself, edited copies), run in the workers; an exception it
    raises fails that sample alone (:class:`~cam_plugin.engine.ErrorKind`
    ``INPUT``, with the message)."""

    def __init__(self, filepaths, transforms, min_side, variants=None):
        self.filepaths = filepaths
        self.transforms = transforms
        self.min_side = min_side
        self.variants = variants
        self._windows = {}

    def __len__(self):
        return len(self.filepaths)

    def __getitem__(self, index):
        path = self.filepaths[index]
        try:
            img, (full_w, full_h) = load_rgb(path, min_side=self.min_side)
        except ImageError as e:
            return SampleError(index, ErrorKind.IMAGE, str(e))
        images, note = [img], None
        if self.variants is not None:
            try:
                made = self.variants(index, img)
            except Exception as e:  # a region that cannot be read, say
                return SampleError(index, ErrorKind.INPUT, f"{e} ({path})")
            images, note = (made.images, made.note) if isinstance(made, Variants) else (made, None)
        try:
            tensors = [self._input(image) for image in images]
            tensor = tensors[0] if self.variants is None else torch.stack(tensors)
            window = self._window(img.size, tuple(tensor.shape[-2:]))
        except Exception as e:  # a transform failing on one image
            return SampleError(index, ErrorKind.PREPROCESS, f"{type(e).__name__}: {e} ({path})")

        window = window.scaled(full_w / img.size[0], full_h / img.size[1])
        return LoadedSample(index, tensor, (full_w, full_h), window.as_tuple(), note)

    def _input(self, img):
        tensor = self.transforms(img)
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3:
            raise TransformError(
                "transforms must return a (channels, height, width) tensor, "
                f"got {type(tensor).__name__} {tuple(getattr(tensor, 'shape', ()))}"
            )
        if not tensor.is_floating_point():
            raise TransformError(
                f"transforms returned a {tensor.dtype} tensor; add ToTensor() "
                "or ToDtype(torch.float32, scale=True)"
            )
        return tensor

    def _window(self, size, out_hw):
        key = (size, out_hw)
        window = self._windows.get(key)
        if window is None:
            window = input_window(self.transforms, size[0], size[1], output_hw=out_hw)
            self._windows[key] = window
        return window


@dataclass
class Group:
    """Loaded samples whose tensors stack: one (N, C, H, W) tensor and the
    samples' :class:`LoadedSample` records (tensors dropped)."""

    tensor: torch.Tensor
    items: list

    def __len__(self):
        return len(self.items)

    def split(self, start, stop):
        return Group(self.tensor[start:stop], self.items[start:stop])

    def pin_memory(self):
        # called by the DataLoader's pin-memory thread: a stacked, pinned
        # batch makes the host-to-device copy asynchronous
        return Group(self.tensor.pin_memory(), self.items)


@dataclass
class LoadedBatch:
    """One loader batch: the loaded samples grouped by tensor shape, and the
    samples that failed to load."""

    groups: list = field(default_factory=list)
    failed: list = field(default_factory=list)

    def __len__(self):
        return len(self.failed) + sum(len(g) for g in self.groups)

    def pin_memory(self):
        return LoadedBatch([g.pin_memory() for g in self.groups], self.failed)


def collate_groups(items):
    """The DataLoader's collate function, run in the loader workers: stacks
    the loaded samples by tensor shape and sets the failures aside."""
    shapes = {}
    failed = []
    for item in items:
        if isinstance(item, SampleError):
            failed.append(item)
        else:
            shapes.setdefault(tuple(item.tensor.shape), []).append(item)

    groups = []
    for members in shapes.values():
        tensor = torch.stack([m.tensor for m in members])
        for m in members:
            m.tensor = None
        groups.append(Group(tensor, members))
    return LoadedBatch(groups, failed)


def image_loader(filepaths, transforms, min_side, batch_size, num_workers, pin_memory=False,
                 variants=None):
    """A DataLoader of :class:`LoadedBatch` over the images (``variants``:
    see :class:`SampleImages`); workers are used only when there is more
    than one batch to decode."""
    return torch.utils.data.DataLoader(
        SampleImages(filepaths, transforms, min_side=min_side, variants=variants),
        batch_size=batch_size,
        num_workers=num_workers if len(filepaths) > batch_size else 0,
        collate_fn=collate_groups,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
