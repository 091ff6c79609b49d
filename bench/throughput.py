"""Dataset-scale throughput and memory of the plugin against a notebook-style
baseline and against the model's own forward pass, measured in one run.

Phases (each in its own subprocess, so peak memory is its own):

(a) plugin: ``compute_cams`` end to end: read images -> CAMs -> heatmap files
    written -> fields saved
(b) baseline: what users write today: pytorch-grad-cam's ``GradCAM`` called
    per batch, then an ``fo.Heatmap`` set and ``sample.save()`` per sample
(c) limit: the model's forward pass alone on already-decoded, already-resized
    tensors

Usage::

    python bench/throughput.py                    # ResNet-50, 256 COCO images
    python bench/throughput.py --device cuda --batch-size 64
    python bench/throughput.py --memory 10000     # RSS over 10,000 samples

Prints throughputs, the ratios a/b and a/c, and peak memory. Set-up (venv,
database) is the same as for the tests; each phase has a MongoDB server of
its own on a temporary directory.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CAM_PLUGIN_SHARED_DATA", REPO.parent / "shared" / "data"))


def _isolate_fiftyone(workdir):
    # a mongod of the phase's own, started before FiftyOne is imported: a
    # database dir alone would join any FiftyOne service already running
    from cam_plugin import private_db

    os.environ["FIFTYONE_DEFAULT_DATASET_DIR"] = str(Path(workdir) / "files")
    os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
    private_db.use(Path(workdir) / "db")


def prepare_images(workdir, count):
    """``count`` real images: the COCO128 images, then their mirror images,
    repeated as needed (written once into ``workdir``)."""
    from PIL import Image, ImageOps

    src = sorted((SHARED / "coco128_train" / "images").glob("*.jpg"))
    if not src:
        sys.exit(f"COCO128 images not found under {SHARED}")

    out = Path(workdir) / "images"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        original = src[i % len(src)]
        variant = (i // len(src)) % 2
        path = out / f"{i:06d}.jpg"
        if not path.exists():
            img = Image.open(original).convert("RGB")
            if variant:
                img = ImageOps.mirror(img)
            img.save(path, quality=95)
        paths.append(str(path))
    return paths


def _model(name):
    import torchvision

    # random weights: throughput does not depend on their values, and the
    # benchmark must not download anything
    return torchvision.models.get_model(name, weights=None).eval()


def _transforms(name):
    import torchvision

    return torchvision.models.get_model_weights(name).DEFAULT.transforms()


def _dataset(name, paths):
    import fiftyone as fo

    if fo.dataset_exists(name):
        fo.delete_dataset(name)
    dataset = fo.Dataset(name)
    dataset.add_samples([fo.Sample(filepath=p) for p in paths])
    return dataset


def phase_plugin(args, paths):
    import cam_plugin
    import torch

    torch.manual_seed(0)
    dataset = _dataset("bench_plugin", paths)
    model = cam_plugin.Classifier(_model(args.model), _transforms(args.model), None, args.model)
    start = time.perf_counter()
    summary = cam_plugin.compute_cams(
        dataset,
        model,
        method="gradcam",
        batch_size=args.batch_size,
        device=args.device,
        mixed_precision=args.amp,
        heatmap_size=args.heatmap_size,
        num_workers=args.workers,
        progress=False,
    )
    seconds = time.perf_counter() - start
    assert summary.processed == len(paths), summary
    return {"seconds": seconds, "images": len(paths)}


def phase_baseline(args, paths):
    import fiftyone as fo
    import torch
    from PIL import Image
    from pytorch_grad_cam import GradCAM

    torch.manual_seed(0)
    dataset = _dataset("bench_baseline", paths)
    model = _model(args.model).to(args.device)
    transforms = _transforms(args.model)
    start = time.perf_counter()
    samples = list(dataset)
    with GradCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
        for i in range(0, len(samples), args.batch_size):
            batch = samples[i : i + args.batch_size]
            x = torch.stack(
                [transforms(Image.open(s.filepath).convert("RGB")) for s in batch]
            ).to(args.device)
            maps = cam(input_tensor=x, targets=None)
            for sample, m in zip(batch, maps):
                sample["cam"] = fo.Heatmap(map=m)
                sample.save()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": len(paths)}


def phase_limit(args, paths):
    import torch
    from PIL import Image

    torch.manual_seed(0)
    model = _model(args.model).to(args.device)
    transforms = _transforms(args.model)
    tensors = [transforms(Image.open(p).convert("RGB")) for p in paths]
    batches = [
        torch.stack(tensors[i : i + args.batch_size]).to(args.device)
        for i in range(0, len(tensors), args.batch_size)
    ]
    cuda = args.device.startswith("cuda")
    with torch.no_grad(), torch.autocast(args.device.split(":")[0], enabled=args.amp and cuda):
        model(batches[0])  # warm-up: allocator, cuDNN autotuning
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for x in batches:
            model(x)
        if cuda:
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": len(paths)}


def phase_memory(args, paths):
    """RSS while the plugin processes many samples: after the first 500 and
    at the end."""
    import cam_plugin
    import psutil
    from cam_plugin.models import cifar_transforms

    dataset = _dataset("bench_memory", paths)
    checkpoint = SHARED / "cifar10_resnet20" / "resnet20-12fca82f.th"
    process = psutil.Process()
    marks = {}

    def progress(pb):
        done = pb.iteration
        if "after_500" not in marks and done >= 500:
            marks["after_500"] = process.memory_info().rss
        marks["last"] = process.memory_info().rss

    start = time.perf_counter()
    cam_plugin.compute_cams(
        dataset,
        f"cifar10_resnet20:{checkpoint}",
        transforms=cifar_transforms(),
        batch_size=args.batch_size,
        device=args.device,
        progress=progress,
    )
    marks["end"] = process.memory_info().rss
    return {
        "seconds": time.perf_counter() - start,
        "images": len(paths),
        "rss_after_500_mb": marks["after_500"] / 2**20,
        "rss_end_mb": marks["end"] / 2**20,
    }


PHASES = {
    "plugin": phase_plugin,
    "baseline": phase_baseline,
    "limit": phase_limit,
    "memory": phase_memory,
}


def small_images(workdir, count):
    """``count`` small real images: the CIFAR-10 sample, cycled."""
    src = sorted((SHARED / "cifar10_test_sample").glob("*/*.jpg"))
    if not src:
        sys.exit(f"CIFAR-10 sample not found under {SHARED}")
    return [str(src[i % len(src)]) for i in range(count)]


def run_phase(args):
    _isolate_fiftyone(args.workdir)
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.phase == "memory":
        paths = small_images(args.workdir, args.memory)
    else:
        paths = prepare_images(args.workdir, args.images)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result = PHASES[args.phase](args, paths)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device.startswith("cuda"):
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result))


def _spawn(args, phase):
    cmd = [sys.executable, __file__, "--phase", phase, "--workdir", args.workdir]
    for name in ("model", "device", "images", "batch_size", "heatmap_size", "memory", "workers"):
        value = getattr(args, name)
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    if args.amp:
        cmd.append("--amp")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"phase {phase} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--heatmap-size", type=int, default=256)
    parser.add_argument("--amp", action="store_true", help="CUDA mixed precision in (a) and (c)")
    parser.add_argument("--workers", type=int, default=None, help="image-decoding workers of (a)")
    parser.add_argument("--phases", default="limit,plugin,baseline", help=argparse.SUPPRESS)
    parser.add_argument("--memory", type=int, default=0, help="also run the RSS test over this many samples")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:
        run_phase(args)
        return

    with tempfile.TemporaryDirectory(prefix="cam_bench_") as workdir:
        args.workdir = workdir
        import platform

        import torch

        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"torch {torch.__version__}, device {args.device}"
              + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
        print(f"model {args.model}, {args.images} images (COCO128 and mirrors), "
              f"batch {args.batch_size}, heatmaps <= {args.heatmap_size}px, Grad-CAM"
              + (", mixed precision" if args.amp else ""))

        results = {}
        for phase in args.phases.split(","):
            results[phase] = _spawn(args, phase)
        if set(results) != {"limit", "plugin", "baseline"}:
            for phase, r in results.items():
                print(phase, f"{r['images'] / r['seconds']:.2f} images/s")
            return

        def rate(r):
            return r["images"] / r["seconds"]

        print()
        print(f"{'phase':<40} {'images/s':>9} {'seconds':>8} {'peak RSS MB':>12}"
              + ("  peak CUDA MB" if args.device.startswith("cuda") else ""))
        labels = {
            "plugin": "(a) plugin end to end",
            "baseline": "(b) pytorch-grad-cam + sample.save()",
            "limit": "(c) forward pass only",
        }
        for phase in ("plugin", "baseline", "limit"):
            r = results[phase]
            line = f"{labels[phase]:<40} {rate(r):>9.2f} {r['seconds']:>8.1f} {r['peak_rss_mb']:>12.0f}"
            if "peak_cuda_mb" in r:
                line += f"  {r['peak_cuda_mb']:>12.0f}"
            print(line)

        a, b, c = rate(results["plugin"]), rate(results["baseline"]), rate(results["limit"])
        print()
        print(f"a/b = {a / b:.2f}   (target >= 1.7)")
        print(f"a/c = {a / c:.2f}   (target >= 0.8)")
        print(f"b/c = {b / c:.2f}")

        if args.memory:
            m = _spawn(args, "memory")
            growth = m["rss_end_mb"] - m["rss_after_500_mb"]
            print()
            print(f"memory: {m['images']} samples (ResNet-20, CIFAR images) at {rate(m):.0f} images/s")
            print(f"RSS after 500: {m['rss_after_500_mb']:.0f} MB, after {m['images']}: "
                  f"{m['rss_end_mb']:.0f} MB, growth {growth:+.0f} MB (target <= 200 MB)")


if __name__ == "__main__":
    main()
