"""The CUDA path, checked and timed without FiftyOne (for accelerator machines
that have no MongoDB): CUDA maps against CPU maps, the default layers of a
CNN and a ViT on the GPU, and the throughput of the plugin's compute core
(decode in DataLoader workers -> CAMs, frame mapping and quantisation on the
GPU -> 16-bit PNGs written) against pytorch-grad-cam per batch with numpy
maps, and against the forward pass alone.

Usage::

    python bench/gpu_check.py --data ../shared/data
"""

import argparse
import glob
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from cam_plugin.batches import compute_batch
from cam_plugin.engine import image_loader
from cam_plugin.cams import CamExtractor
from cam_plugin.cifar_resnet import load_resnet20_checkpoint
from cam_plugin.heatmaps import PngWriter
from cam_plugin.models import cifar_transforms, input_shape_of

DEVICE = "cuda"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def pearson(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    if a.std() == 0 and b.std() == 0:
        return 1.0
    return float(np.corrcoef(a, b)[0, 1])


def check_cuda_equals_cpu(data):
    model = load_resnet20_checkpoint(data / "cifar10_resnet20" / "resnet20-12fca82f.th")
    files = sorted(glob.glob(str(data / "cifar10_test_sample" / "*" / "*.jpg")))[:64]
    t = cifar_transforms()
    x = torch.stack([t(Image.open(f).convert("RGB")) for f in files])
    print(f"CUDA vs CPU maps, CIFAR-10 ResNet-20, {len(x)} images (min Pearson per image):")
    for method in ["cam", "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam",
                   "scorecam", "eigencam", "ablationcam", "guided-gradcam", "gradcam-counterfactual"]:
        maps = {}
        seconds = {}
        for device in ("cpu", DEVICE):
            m = model.to(device)
            ex = CamExtractor(m, method, (3, 32, 32), layer="layer3", chunk_size=256)
            start = time.perf_counter()
            r = ex(x.to(device), {"pred": lambda logits: logits.argmax(1)})
            if device == DEVICE:
                sync()
            seconds[device] = time.perf_counter() - start
            maps[device] = r.maps[:, 0].float().cpu().numpy()
        corr = min(pearson(a, b) for a, b in zip(maps["cpu"], maps[DEVICE]))
        print(f"  {method:<24} {corr:.6f}   cpu {seconds['cpu']:.3f}s  cuda {seconds[DEVICE]:.3f}s")
    model.cpu()


def check_default_layers():
    print("default layers on CUDA (random weights):")
    for name in ["resnet50", "densenet121", "efficientnet_b0", "convnext_tiny", "vit_b_16", "swin_t"]:
        model = torchvision.models.get_model(name, weights=None).eval().to(DEVICE)
        with torch.no_grad():
            # torchvision zero-initialises some heads (ViT): no gradient at all
            for p in model.parameters():
                if p.numel() > 1 and not torch.any(p):
                    p.normal_(0, 0.02)
        ex = CamExtractor(model, "gradcam", (3, 224, 224))
        x = torch.randn(4, 3, 224, 224, device=DEVICE)
        maps = ex(x, {"pred": lambda logits: logits.argmax(1)}).maps
        print(f"  {name:<16} layer {ex.layer:<36} {ex.layout.describe():<34} std {maps.std().item():.3g}")
        del model, ex


def core_plugin(paths, model, transforms, batch_size, amp, workdir, workers):
    """The plugin's compute core, as the pipeline runs it, minus the
    database writes."""
    ex = CamExtractor(model, "gradcam", input_shape_of(transforms), autocast=amp, chunk_size=256)
    loader = image_loader(paths, transforms, 224, batch_size, workers, pin_memory=DEVICE == "cuda")
    picks = {"pred": lambda logits, gt: logits.argmax(1)}
    done = 0
    with PngWriter(num_threads=8) as writer:
        for batch in loader:
            for group in batch.groups:
                gt = [-1] * len(group)
                for i, result in enumerate(compute_batch(ex, group, gt, picks, 256, DEVICE)):
                    writer.submit(os.path.join(workdir, f"{done + i}.png"), result.maps["pred"].levels)
                done += len(group)
    return done


def decode_only(paths, transforms, batch_size, workers):
    """The image loading alone: the CPU-side bound of (a)."""
    loader = image_loader(paths, transforms, 224, batch_size, workers)
    start = time.perf_counter()
    n = sum(sum(len(g) for g in batch.groups) for batch in loader)
    return n / (time.perf_counter() - start)


def core_baseline(paths, model, transforms, batch_size):
    """What users write today, minus the database: pytorch-grad-cam per batch,
    maps back as numpy."""
    from pytorch_grad_cam import GradCAM

    maps = []
    with GradCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
        for i in range(0, len(paths), batch_size):
            x = torch.stack([transforms(Image.open(p).convert("RGB")) for p in paths[i : i + batch_size]])
            out = cam(input_tensor=x.to(DEVICE), targets=None)
            maps.extend(np.asarray(m) for m in out)
    return len(maps)


def core_limit(paths, model, transforms, batch_size, amp):
    tensors = [transforms(Image.open(p).convert("RGB")) for p in paths]
    batches = [torch.stack(tensors[i : i + batch_size]).to(DEVICE) for i in range(0, len(tensors), batch_size)]
    with torch.no_grad(), torch.autocast(DEVICE, enabled=amp and DEVICE == "cuda"):
        model(batches[0])
        sync()
        start = time.perf_counter()
        for x in batches:
            model(x)
        sync()
    return len(paths), time.perf_counter() - start


def throughput(data, images, batch_size, workers):
    src = sorted(glob.glob(str(data / "coco128_train" / "images" / "*.jpg")))
    paths = [src[i % len(src)] for i in range(images)]
    transforms = torchvision.models.ResNet50_Weights.DEFAULT.transforms()
    model = torchvision.models.resnet50(weights=None).eval().to(DEVICE)
    print(f"\nthroughput, ResNet-50, Grad-CAM, {images} COCO images, batch {batch_size}, "
          f"{workers} decode workers, {DEVICE}:")
    rows = {}
    for amp in (False, True):
        with tempfile.TemporaryDirectory() as workdir:
            core_plugin(paths[:batch_size], model, transforms, batch_size, amp, workdir, workers)  # warm-up
            if DEVICE == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            n = core_plugin(paths, model, transforms, batch_size, amp, workdir, workers)
            sync()
            peak = torch.cuda.max_memory_allocated() / 2**20 if DEVICE == "cuda" else None
            rows[f"(a) plugin core{' amp' if amp else ''}"] = (n / (time.perf_counter() - start), peak)
        n, s = core_limit(paths, model, transforms, batch_size, amp)
        rows[f"(c) forward only{' amp' if amp else ''}"] = (n / s, None)
    rows["decode + preprocess only"] = (decode_only(paths, transforms, batch_size, workers), None)
    start = time.perf_counter()
    n = core_baseline(paths, model, transforms, batch_size)
    rows["(b) pytorch-grad-cam + numpy"] = (n / (time.perf_counter() - start), None)
    for name, (rate, mem) in rows.items():
        print(f"  {name:<32} {rate:>9.1f} images/s" + (f"   peak CUDA {mem:.0f} MB" if mem else ""))
    a, b, c = rows["(a) plugin core"][0], rows["(b) pytorch-grad-cam + numpy"][0], rows["(c) forward only"][0]
    print(f"  a/b = {a / b:.2f}, a/c = {a / c:.2f} (fp32); amp a/c = "
          f"{rows['(a) plugin core amp'][0] / rows['(c) forward only amp'][0]:.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of this script")
    parser.add_argument("--profile", action="store_true", help="profile (a) alone")
    parser.add_argument("--throughput-only", action="store_true")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {name}")
    if args.profile:
        import cProfile
        import pstats

        src = sorted(glob.glob(str(args.data / "coco128_train" / "images" / "*.jpg")))
        paths = [src[i % len(src)] for i in range(args.images)]
        transforms = torchvision.models.ResNet50_Weights.DEFAULT.transforms()
        model = torchvision.models.resnet50(weights=None).eval().to(DEVICE)
        with tempfile.TemporaryDirectory() as workdir:
            core_plugin(paths[:64], model, transforms, args.batch_size, False, workdir, args.workers)
            profile = cProfile.Profile()
            start = time.perf_counter()
            profile.runcall(core_plugin, paths, model, transforms, args.batch_size, False, workdir, args.workers)
            print(f"{args.images / (time.perf_counter() - start):.1f} images/s")
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
        return
    if not args.throughput_only:
        check_cuda_equals_cpu(args.data)
        check_default_layers()
    throughput(args.data, args.images, args.batch_size, args.workers)


if __name__ == "__main__":
    main()
