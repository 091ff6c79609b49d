"""Bad input, interruptions and re-runs: failures are per sample and explained,
nothing the user had is lost, runs resume without redoing work."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import fiftyone as fo
import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import cam_plugin
from cam_plugin import heatmaps
from cam_plugin.cifar_resnet import IMAGENET_MEAN, IMAGENET_STD
from builders import cifar_dataset


@pytest.fixture(scope="module")
def resnet20(resnet20_path):
    return f"cifar10_resnet20:{resnet20_path}"


def _good_images(cifar_dir, n):
    return sorted(Path(cifar_dir).glob("*/*.jpg"))[:n]


def _make_bad_inputs(root, cifar_dir):
    """Every kind of awkward input, as {name: (path, expected)} where
    expected is "ok" or a pattern the recorded error must match."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    src = Image.open(_good_images(cifar_dir, 1)[0]).convert("RGB").resize((64, 48))
    cases = {}

    cases["missing"] = (root / "missing.jpg", "file not found")

    good_jpeg = root / "full.jpg"
    src.save(good_jpeg, quality=95)
    data = good_jpeg.read_bytes()
    truncated = root / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    cases["truncated"] = (truncated, "corrupt or truncated")

    corrupt = root / "corrupt.jpg"
    corrupt.write_bytes(data[:20] + bytes(range(256)) * 4)
    # a JPEG header followed by garbage: unreadable
    cases["corrupt"] = (corrupt, "not an image file|corrupt or truncated")

    text = root / "notes.jpg"
    text.write_text("this is not an image\n" * 10)
    cases["not_image"] = (text, "not an image file")

    gray = root / "gray.jpg"
    src.convert("L").save(gray)
    cases["grayscale"] = (gray, "ok")

    rgba = root / "rgba.png"
    src.convert("RGBA").save(rgba)
    cases["rgba"] = (rgba, "ok")

    palette = root / "palette.png"
    src.convert("P", palette=Image.Palette.ADAPTIVE).save(palette)
    cases["palette"] = (palette, "ok")

    deep = root / "deep16.png"
    gray16 = (np.asarray(src.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(gray16).save(deep)
    cases["png16"] = (deep, "ok")

    cmyk = root / "cmyk.jpg"
    src.convert("CMYK").save(cmyk)
    cases["cmyk"] = (cmyk, "ok")

    rotated = root / "exif_rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    src.save(rotated, exif=exif.tobytes())
    cases["exif_rotated"] = (rotated, "ok")

    tiny = root / "tiny.png"
    src.resize((3, 2)).save(tiny)
    cases["tiny"] = (tiny, "ok")

    large = root / "large.jpg"
    big = Image.new("RGB", (12000, 9000), (90, 120, 60))
    big.paste(src.resize((3000, 2250)), (4000, 3000))
    big.save(large, quality=85)
    del big
    cases["large"] = (large, "ok")

    return cases


def test_bad_inputs_fail_alone_with_clear_errors(dataset_name, cifar_dir, resnet20, tmp_path):
    cases = _make_bad_inputs(tmp_path / "bad", cifar_dir)
    good = _good_images(cifar_dir, 12)
    samples = [fo.Sample(filepath=str(p), kind="good") for p in good]
    samples += [fo.Sample(filepath=str(path), kind=name) for name, (path, _) in cases.items()]
    dataset = fo.Dataset(dataset_name)
    dataset.add_samples(samples)

    summary = cam_plugin.compute_cams(dataset, resnet20, batch_size=4, num_workers=1)

    expected_bad = {n for n, (_, e) in cases.items() if e != "ok"}
    assert summary.failed == len(expected_bad)
    assert summary.processed == len(dataset) - len(expected_bad)
    assert sum(summary.errors.values()) == summary.failed
    assert cam_plugin.get_run(dataset, "cam")["counts"]["failed"] == len(expected_bad)

    for sample in dataset:
        if sample.kind == "good" or cases[sample.kind][1] == "ok":
            assert sample.cam_error is None, (sample.kind, sample.cam_error)
            assert os.path.isfile(sample.cam.map_path), sample.kind
            assert sample.cam_prediction is not None
        else:
            assert sample.cam is None
            assert re.search(cases[sample.kind][1], sample.cam_error), (sample.kind, sample.cam_error)
            assert os.path.basename(sample.filepath) in sample.cam_error

    by_kind = {s.kind: s for s in dataset}
    # heatmaps live in the displayed frame: EXIF rotation swaps the axes
    rot = heatmaps.read_levels(by_kind["exif_rotated"].cam.map_path)
    assert rot.shape == (64, 48)
    plain = heatmaps.read_levels(by_kind["grayscale"].cam.map_path)
    assert plain.shape == (48, 64)
    # the 12000x9000 image is mapped at capped resolution, same aspect
    assert heatmaps.read_levels(by_kind["large"].cam.map_path).shape == (192, 256)


def test_tiny_image_without_resize_fails_only_itself(dataset_name, cifar_dir, resnet20, tmp_path):
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1), (200, 10, 10)).save(tiny)
    paths = [str(p) for p in _good_images(cifar_dir, 6)]
    paths.insert(3, str(tiny))
    dataset = fo.Dataset(dataset_name)
    dataset.add_samples([fo.Sample(filepath=p) for p in paths])

    no_resize = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    summary = cam_plugin.compute_cams(dataset, resnet20, transforms=no_resize, batch_size=8)

    assert summary.processed == 6 and summary.failed == 1
    failed = dataset.exists("cam_error").first()
    assert failed.filepath == str(tiny)
    assert failed.cam_error.startswith("computation failed: ")


def test_configuration_errors_before_any_work(dataset_name, cifar_dir, resnet20):
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)

    with pytest.raises(cam_plugin.CamError, match=r"no layer named 'layer9'.*layer3"):
        cam_plugin.compute_cams(dataset, resnet20, target_layer="layer9")

    flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    with pytest.raises(cam_plugin.CamError, match="no layer with a spatial output"):
        cam_plugin.compute_cams(dataset, flat, transforms=T.Compose([T.Resize((32, 32)), T.ToTensor()]))

    with pytest.raises(cam_plugin.CamError, match=r"has 10 outputs but 9 class names were given"):
        cam_plugin.compute_cams(dataset, resnet20, classes=[f"c{i}" for i in range(9)])
    assert not dataset.has_sample_field("cam_prediction")

    dataset.set_values("ground_truth.label", ["wolf"] + dataset.values("ground_truth.label")[1:])
    with pytest.raises(cam_plugin.CamError, match=r"not among the model's 10 classes: wolf"):
        cam_plugin.compute_cams(dataset, resnet20, label_field="ground_truth")

    dataset.add_sample_field("cam", fo.StringField)
    with pytest.raises(cam_plugin.RunError, match="already exists with type StringField"):
        cam_plugin.compute_cams(dataset, resnet20)

    # nothing was written by the refused runs
    assert cam_plugin.list_runs(dataset) == []
    assert "cam_prediction" not in dataset.get_field_schema()


def test_run_keys_refuse_finished_or_different_runs(dataset_name, cifar_dir, resnet20):
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    cam_plugin.compute_cams(dataset, resnet20)
    first_paths = dataset.values("cam.map_path")

    # the same call again has nothing left to do
    again = cam_plugin.compute_cams(dataset, resnet20)
    assert (again.processed, again.skipped, again.status) == (0, len(dataset), "completed")
    with pytest.raises(cam_plugin.RunError, match="different configuration.*cam_method"):
        cam_plugin.compute_cams(dataset, resnet20, method="gradcam++")

    # a user field is never replaced, whatever overwrite says
    dataset.add_sample_field("mine", fo.EmbeddedDocumentField, embedded_doc_type=fo.Classification)
    for overwrite in (False, True):
        with pytest.raises(cam_plugin.RunError, match="not made by this plugin"):
            cam_plugin.compute_cams(
                dataset, resnet20, pred_field="mine", heatmap_field="cam2", overwrite=overwrite
            )

    # fields of another run are refused even with overwrite
    with pytest.raises(cam_plugin.RunError, match="belongs to run 'cam'"):
        cam_plugin.compute_cams(dataset, resnet20, heatmap_field="cam3", overwrite=True)

    summary = cam_plugin.compute_cams(dataset, resnet20, method="gradcam++", overwrite=True)
    assert summary.processed == len(dataset)
    assert cam_plugin.get_run(dataset, "cam")["cam_method"] == "gradcam++"
    # the replaced run's files went with it; the new run has its own
    new_paths = dataset.values("cam.map_path")
    assert not any(os.path.exists(p) for p in first_paths)
    assert all(os.path.isfile(p) for p in new_paths) and set(new_paths).isdisjoint(first_paths)


def test_delete_run_removes_exactly_its_fields_and_files(dataset_name, cifar_dir, resnet20, tmp_path):
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=2)
    out = tmp_path / "heatmaps"
    keep = out / "user_file.txt"
    out.mkdir()
    keep.write_text("mine")
    dataset.add_sample_field("notes", fo.StringField)
    dataset.set_values("notes", ["n"] * len(dataset))

    cam_plugin.compute_cams(dataset, resnet20, label_field="ground_truth", output_dir=str(out))
    cam_plugin.compute_cams(
        dataset, resnet20, heatmap_field="other", pred_field="other_pred", method="hirescam",
        output_dir=str(out),
    )
    cam_dir = Path(cam_plugin.get_run(dataset, "cam")["files_dir"])
    other_dir = Path(cam_plugin.get_run(dataset, "other")["files_dir"])
    assert cam_dir.parent.parent == out and cam_dir != other_dir
    mine_in_run_dir = cam_dir / "notes.txt"
    mine_in_run_dir.write_text("also mine")
    cam_files = set(cam_dir.rglob("*.png"))
    other_files = set(other_dir.rglob("*.png"))
    assert len(cam_files) == 2 * len(dataset) and len(other_files) == len(dataset)

    before = set(dataset.get_field_schema())
    cam_plugin.delete_run(dataset, "cam")

    after = set(dataset.get_field_schema())
    assert before - after == {"cam", "cam_gt", "cam_prediction", "cam_error"}
    assert not any(p.exists() for p in cam_files)
    # only what the run wrote is gone
    assert [p.name for p in cam_dir.rglob("*")] == ["notes.txt"]
    assert all(p.exists() for p in other_files)
    assert keep.read_text() == "mine"
    assert dataset.values("notes") == ["n"] * len(dataset)
    assert cam_plugin.list_runs(dataset) == ["other"]


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    import fiftyone as fo
    import cam_plugin

    dataset = fo.load_dataset(sys.argv[1])
    cam_plugin.compute_cams(dataset, sys.argv[2], batch_size=4, num_workers=0, device="cpu")
    """
)


def test_kill_and_resume(dataset_name, cifar_dir, resnet20, tmp_path):
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=30)
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT)
    # results land batch by batch (not every 2 s), so that the kill finds the
    # run half-stored even on a fast, quiet machine
    env = dict(os.environ, CAM_PLUGIN_FLUSH_SECONDS="0")
    proc = subprocess.Popen([sys.executable, str(script), dataset_name, resnet20], env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if dataset.exists("cam").count() >= 40:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()

    killed_at = time.time()
    dataset.reload()
    done_before = dict(zip(*dataset.exists("cam").values(["id", "cam.map_path"])))
    assert 40 <= len(done_before) < len(dataset)
    mtimes = {sid: os.path.getmtime(p) for sid, p in done_before.items()}
    assert cam_plugin.get_run(dataset, "cam")["status"] == "running"

    time.sleep(0.05)
    summary = cam_plugin.compute_cams(dataset, resnet20)

    assert summary.resumed
    assert summary.skipped == len(done_before)
    assert summary.processed == len(dataset) - len(done_before)
    assert cam_plugin.get_run(dataset, "cam")["status"] == "completed"

    files_dir = Path(cam_plugin.get_run(dataset, "cam")["files_dir"])
    files = sorted(p.name for p in files_dir.rglob("*.png*") if p.is_file())
    ids = sorted(f"{sid}.png" for sid in dataset.values("id"))
    assert files == ids  # exactly one file per sample, no temporary files
    for sid, path in done_before.items():
        assert os.path.getmtime(path) == mtimes[sid] < killed_at  # not recomputed
    assert dataset.exists("cam").count() == len(dataset)


_CONCURRENT_SCRIPT = textwrap.dedent(
    """
    import sys
    import fiftyone as fo
    import cam_plugin

    dataset = fo.load_dataset(sys.argv[1])
    key, method = sys.argv[3], sys.argv[4]
    summary = cam_plugin.compute_cams(
        dataset, sys.argv[2], heatmap_field=key, pred_field=f"{key}_pred",
        method=method, batch_size=4, num_workers=0,
    )
    assert summary.processed == len(dataset), summary
    """
)


def test_two_runs_at_once_do_not_interfere(dataset_name, cifar_dir, resnet20, tmp_path):
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=6)
    script = tmp_path / "run.py"
    script.write_text(_CONCURRENT_SCRIPT)
    procs = [
        subprocess.Popen([sys.executable, str(script), dataset_name, resnet20, key, method])
        for key, method in (("cam_a", "gradcam"), ("cam_b", "hirescam"))
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]

    dataset.reload()
    schema = dataset.get_field_schema()
    for key, method in (("cam_a", "gradcam"), ("cam_b", "hirescam")):
        assert {key, f"{key}_pred", f"{key}_error"} <= set(schema)
        assert dataset.count(f"{key}.map_path") == len(dataset)
        assert dataset.count(f"{key}_pred") == len(dataset)
        run = cam_plugin.get_run(dataset, key)
        assert (run["status"], run["cam_method"]) == ("completed", method)
    # each sample's two maps are distinct files of their own run
    for a, b in zip(dataset.values("cam_a.map_path"), dataset.values("cam_b.map_path")):
        assert a != b and os.path.isfile(a) and os.path.isfile(b)


class _FailsOnRealImages(torch.nn.Module):
    """A model that works on the layer probe's random input and raises on
    every real image (all in [0, 1], unnormalised): a configuration problem,
    not a data problem."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x):
        if x.min() >= 0:
            raise RuntimeError("this model cannot take real images")
        return self.head(self.conv(x).mean((2, 3)))


def test_a_model_that_fails_on_every_image_stops_the_run(dataset_name, cifar_dir):
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=3)
    transforms = T.Compose([T.Resize((32, 32)), T.ToTensor()])
    with pytest.raises(cam_plugin.CamError, match=r"first 16 samples all failed.*cannot take real images"):
        cam_plugin.compute_cams(dataset, _FailsOnRealImages(), transforms=transforms, batch_size=4)
    # what was tried is recorded, and the run can be continued once fixed
    run = cam_plugin.get_run(dataset, "cam")
    assert run["status"] == "running" and run["counts"]["failed"] >= 16
