"""The FiftyOne-free run engine on its own: no database, real images and a
real model; CUDA out-of-memory halving with a module that raises
``torch.cuda.OutOfMemoryError`` above a batch size, and failure isolation
with typed errors."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from cam_plugin.engine import BatchRunner, ErrorKind, SampleError, image_loader, run_loader
from cam_plugin.models import cifar_transforms


class OutOfMemoryAbove(torch.nn.Module):
    """A classifier that runs out of "GPU memory" on batches larger than
    ``limit``, and records the batch sizes it was given."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit
        self.sizes = []
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.head = torch.nn.Linear(4, 10)

    def forward(self, x):
        self.sizes.append(len(x))
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (batch of {len(x)})")
        return self.head(self.conv(x).mean((2, 3)))


def _images(cifar_dir, n):
    return [str(p) for p in sorted(Path(cifar_dir).glob("*/*.jpg"))[:n]]


def _run(paths, model, batch_size, max_batch=None):
    loader = image_loader(paths, cifar_transforms(), min_side=32, batch_size=batch_size, num_workers=0)
    runner = BatchRunner(lambda group: list(model(group.tensor).argmax(1).tolist()), max_batch or batch_size)
    outcomes = {}
    for batch in run_loader(loader, runner):
        for index, result in batch:
            assert index not in outcomes, "a sample came back twice"
            outcomes[index] = result
    return outcomes, runner


def test_out_of_memory_halves_the_batch_and_keeps_it_small(cifar_dir):
    paths = _images(cifar_dir, 37)
    model = OutOfMemoryAbove(limit=5).eval()
    with torch.no_grad():
        outcomes, runner = _run(paths, model, batch_size=16)

    assert sorted(outcomes) == list(range(len(paths)))
    assert not any(isinstance(r, SampleError) for r in outcomes.values())
    # 16 -> 8 -> 4, and the rest of the run stays at 4
    assert runner.max_batch == 4
    assert max(model.sizes[model.sizes.index(4):]) == 4
    assert model.sizes[:3] == [16, 8, 4]
    with torch.no_grad():
        reference = OutOfMemoryAbove(limit=100)
        reference.load_state_dict(model.state_dict())
        expected, _ = _run(paths, reference, batch_size=16)
    assert outcomes == expected  # same predictions whatever the batch size


def test_out_of_memory_on_one_sample_fails_only_that_sample(cifar_dir):
    paths = _images(cifar_dir, 6)
    with torch.no_grad():
        outcomes, _ = _run(paths, OutOfMemoryAbove(limit=0).eval(), batch_size=4)
    assert all(r.kind is ErrorKind.OUT_OF_MEMORY for r in outcomes.values())
    assert sorted(outcomes) == list(range(6))


def test_bad_samples_fail_alone_with_typed_errors(cifar_dir, tmp_path):
    paths = _images(cifar_dir, 8)
    missing = str(tmp_path / "missing.jpg")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (3, 3)).save(tiny)
    paths[2:2] = [missing, str(broken), str(tiny)]

    class FailsOnTinyInput(torch.nn.Module):
        def forward(self, x):
            # a blank image is constant in every channel, even normalised
            if (x.flatten(2).std(2).sum(1) == 0).any():
                raise ValueError("an all-black input")
            return torch.zeros(len(x), 10)

    outcomes, _ = _run(paths, FailsOnTinyInput(), batch_size=4)
    errors = {i: r for i, r in outcomes.items() if isinstance(r, SampleError)}
    assert errors[2].kind is ErrorKind.IMAGE and "file not found" in errors[2].detail
    assert missing in errors[2].message
    assert errors[3].kind is ErrorKind.IMAGE and "broken.jpg" in errors[3].message
    # the black image breaks its batch; the others of that batch still succeed
    assert errors[4].kind is ErrorKind.COMPUTE and "all-black" in errors[4].detail
    assert set(errors) == {2, 3, 4}
    assert len(outcomes) == len(paths)


@pytest.mark.parametrize("workers", [0, 2])
def test_decoding_in_workers_gives_the_same_batches(cifar_dir, workers):
    paths = _images(cifar_dir, 20)
    loader = image_loader(paths, cifar_transforms(), min_side=32, batch_size=8, num_workers=workers)
    seen = []
    for batch in loader:
        for group in batch.groups:
            assert group.tensor.shape[1:] == (3, 32, 32)
            seen += [item.index for item in group.items]
    assert sorted(seen) == list(range(20))
