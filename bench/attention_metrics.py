"""Benchmark of the attention metrics: 10,000 precomputed 224 x 224 maps
against box regions (1-3 random boxes each, rasterised in the timed loop),
compared with a plain per-sample numpy loop measured in the same run.

Usage: python bench/attention_metrics.py [--n 10000] [--threads 1]

On a machine shared with other busy processes, OpenMP's spin-waiting makes
torch's multi-threaded kernels many times slower: run with --threads 1 or
OMP_WAIT_POLICY=PASSIVE there.
"""

import argparse
import math
import statistics
import time

import numpy as np
import torch

from cam_plugin.metrics import attention_metrics
from cam_plugin.regions import box_masks

KEYS = ("object_energy", "object_area", "pointing_hit", "border_energy")


def make_inputs(n, size, max_boxes, seed, device):
    """Random maps and 1..max_boxes random boxes per map (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    maps = torch.rand((n, size, size), generator=gen)
    xy = torch.rand((n, max_boxes, 2), generator=gen) * 0.9
    wh = (0.05 + torch.rand((n, max_boxes, 2), generator=gen) * 0.6).minimum(1 - xy)
    boxes = torch.cat([xy, wh], dim=-1).double()
    counts = torch.randint(1, max_boxes + 1, (n, 1), generator=gen)
    valid = torch.arange(max_boxes)[None, :] < counts
    return maps.to(device), boxes.to(device), valid.to(device)


def batched(maps, boxes, valid, chunk, tolerance, border):
    """Box regions and all metrics, chunk by chunk (regions never exist for all maps)."""
    _, height, width = maps.shape
    parts = []
    for start in range(0, len(maps), chunk):
        stop = start + chunk
        regions = box_masks(boxes[start:stop], valid[start:stop], height, width)
        metrics = attention_metrics(
            maps[start:stop], regions, tolerance=tolerance, border=border, chunk_size=chunk
        )
        parts.append(metrics)
    return {k: torch.cat([p[k] for p in parts]) for k in KEYS}


def numpy_loop(maps, boxes, valid, tolerance, border):
    """The baseline: the same metrics, one sample at a time, in numpy."""
    n, height, width = maps.shape
    cy = (np.arange(height) + 0.5) / height
    cx = (np.arange(width) + 0.5) / width
    bh, bw = max(1, round(border * height)), max(1, round(border * width))
    band = np.zeros((height, width), dtype=bool)
    band[:bh], band[height - bh :], band[:, :bw], band[:, width - bw :] = True, True, True, True

    out = {k: np.full(n, np.nan) for k in KEYS}
    for s in range(n):
        heat = maps[s].astype(np.float64)
        region = np.zeros((height, width), dtype=bool)
        for (x, y, w, h), ok in zip(boxes[s], valid[s]):
            if ok:
                region |= ((y <= cy) & (cy < y + h))[:, None] & ((x <= cx) & (cx < x + w))[None, :]

        total = heat.sum()
        out["object_area"][s] = region.mean()
        if total > 0:
            out["object_energy"][s] = heat[region].sum() / total
            out["border_energy"][s] = heat[band].sum() / total
            if region.any():
                rows, cols = np.nonzero(region)
                peaks = zip(*np.nonzero(heat == heat.max()))
                out["pointing_hit"][s] = float(
                    any(((rows - i) ** 2 + (cols - j) ** 2 <= tolerance**2).any() for i, j in peaks)
                )
    return out


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="number of maps")
    parser.add_argument("--size", type=int, default=224, help="map side, in pixels")
    parser.add_argument("--max-boxes", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=64, help="maps per chunk")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the batched path")
    parser.add_argument("--baseline-n", type=int, default=300, help="maps the numpy loop is timed on")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tolerance, border = 15.0, 0.1

    maps, boxes, valid = make_inputs(args.n, args.size, args.max_boxes, args.seed, device)
    print(
        f"{args.n} maps of {args.size}x{args.size} "
        f"(float32, {maps.nbytes / 2**30:.2f} GiB, precomputed), "
        f"1-{args.max_boxes} boxes each; device {device}, torch threads {torch.get_num_threads()}, "
        f"chunk {args.chunk}"
    )

    # Warm-up (allocator, kernels) on a few chunks, then the timed runs
    def run(count):
        return batched(maps[:count], boxes[:count], valid[:count], args.chunk, tolerance, border)

    run(4 * args.chunk)
    runs = []
    for _ in range(args.repeats):
        seconds, result = timed(lambda: run(args.n), device)
        runs.append(seconds)
    best, median = min(runs), statistics.median(runs)
    print(
        f"batched torch (box regions + all metrics): best {best:.3f} s, median {median:.3f} s "
        f"of {args.repeats} -> {args.n / best:,.0f} maps/s"
    )

    m = min(args.baseline_n, args.n)
    sub = (maps[:m].cpu().numpy(), boxes[:m].cpu().numpy(), valid[:m].cpu().numpy())
    seconds, reference = timed(lambda: numpy_loop(*sub, tolerance, border), torch.device("cpu"))
    per_map = seconds / m
    print(
        f"numpy per-sample loop: {seconds:.3f} s for {m} maps ({per_map * 1e3:.2f} ms/map, "
        f"{1 / per_map:,.0f} maps/s) -> {per_map * args.n:.1f} s extrapolated to {args.n}"
    )
    print(f"speed-up: {per_map * args.n / best:.1f}x")

    # The two agree on the subset (a benchmark of wrong numbers is no use)
    diffs = {}
    for key in KEYS:
        ours = result[key][:m].double().cpu().numpy()
        same_nan = np.array_equal(np.isnan(ours), np.isnan(reference[key]))
        diff = np.nanmax(np.abs(ours - reference[key])) if not np.isnan(ours).all() else 0.0
        diffs[key] = diff if same_nan else math.inf
    listed = ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
    print(f"max |batched - numpy| on the subset: {listed}")


if __name__ == "__main__":
    main()
