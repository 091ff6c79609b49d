"""The CAM methods against the reference implementation (pytorch-grad-cam),
against theory, and under the model-randomisation sanity check."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import fiftyone as fo

import cam_plugin
from cam_plugin.cams import CamExtractor
from cam_plugin.cifar_resnet import load_resnet20_checkpoint
from cam_plugin.models import cifar_transforms, imagenet_transforms

pgc = pytest.importorskip("pytorch_grad_cam", reason="grad-cam is a test dependency")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402
from pytorch_grad_cam.utils.svd_on_activations import (  # noqa: E402
    get_2d_projection_with_sign_correction,
)

# our name -> reference class; both implement these
REFERENCE = {
    "gradcam": pgc.GradCAM,
    "gradcam++": pgc.GradCAMPlusPlus,
    "xgradcam": pgc.XGradCAM,
    "layercam": pgc.LayerCAM,
    "hirescam": pgc.HiResCAM,
    "scorecam": pgc.ScoreCAM,
    "ablationcam": pgc.AblationCAM,
}


def _pearson(a, b):
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.std() == 0 or b.std() == 0:
        return 1.0 if np.allclose(a / max(a.max(), 1e-12), b / max(b.max(), 1e-12)) else 0.0
    return float(np.corrcoef(a, b)[0, 1])


def _spearman(a, b):
    ra = np.argsort(np.argsort(np.ravel(a))).astype(np.float64)
    rb = np.argsort(np.argsort(np.ravel(b))).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def _to_input_grid(maps, size):
    """Our maps, resized to the input size and divided by their max."""
    up = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    peak = up.flatten(1).amax(dim=1).clamp_min(1e-12)
    return (up / peak[:, None, None]).numpy()


def _ours(model, method, layer, x, classes):
    ex = CamExtractor(model, method, tuple(x.shape[1:]), layer=layer, chunk_size=128)
    result = ex(x, {"target": lambda logits: classes})
    return result.maps[:, 0]


def _reference(model, method, layer_module, x, classes):
    targets = [ClassifierOutputTarget(int(c)) for c in classes]
    with REFERENCE[method](model=model, target_layers=[layer_module]) as ref:
        if hasattr(ref, "batch_size"):
            ref.batch_size = 64
        return ref(input_tensor=x, targets=targets)


def _assert_equivalent(model, layer, x, methods, min_corr=0.99):
    with torch.no_grad():
        classes = model(x).argmax(1)
    layer_module = model.get_submodule(layer)
    report = {}
    for method in methods:
        ours = _to_input_grid(_ours(model, method, layer, x, classes), x.shape[-2:])
        ref = _reference(model, method, layer_module, x, classes)
        corrs = [_pearson(o, r) for o, r in zip(ours, ref)]
        report[method] = min(corrs)
    failing = {m: round(c, 4) for m, c in report.items() if c < min_corr}
    assert not failing, f"maps differ from pytorch-grad-cam: {failing} (all: {report})"
    return report


@pytest.fixture(scope="module")
def resnet20(resnet20_path):
    return load_resnet20_checkpoint(resnet20_path)


@pytest.fixture(scope="module")
def cifar_batch(cifar_dir):
    """20 real CIFAR-10 test images, two per class."""
    files = [p for d in sorted(Path(cifar_dir).iterdir()) for p in sorted(d.glob("*.jpg"))[:2]]
    t = cifar_transforms()
    return torch.stack([t(Image.open(f).convert("RGB")) for f in files])


@pytest.fixture(scope="module")
def efficientnet_lite0():
    import builders

    return builders.efficientnet_lite0().module


@pytest.fixture(scope="module")
def coco_batch(coco_dir):
    """20 real COCO images, ImageNet preprocessing at 224."""
    files = sorted((Path(coco_dir) / "images").glob("*.jpg"))[:20]
    t = imagenet_transforms()
    return torch.stack([t(Image.open(f).convert("RGB")) for f in files])


def test_equivalence_resnet20(resnet20, cifar_batch):
    assert len(cifar_batch) >= 20
    _assert_equivalent(resnet20, "layer3", cifar_batch, list(REFERENCE))


def test_equivalence_efficientnet_lite0_gradient_methods(efficientnet_lite0, coco_batch):
    gradient = ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam"]
    _assert_equivalent(efficientnet_lite0, "_bn1", coco_batch, gradient)


def test_equivalence_efficientnet_lite0_perturbation_methods(efficientnet_lite0, coco_batch):
    # Score-CAM and Ablation-CAM run one forward pass per channel and image,
    # so they are compared where the channels are few: the 16-channel
    # projection of the first block (pre-activation, so Ablation-CAM's
    # removal rule for negative activations is exercised too), at 160x160
    small = F.interpolate(coco_batch, size=(160, 160), mode="bilinear", align_corners=False)
    _assert_equivalent(efficientnet_lite0, "_blocks.0._bn2", small, ["scorecam", "ablationcam"])


@pytest.mark.parametrize("model_name", ["resnet20", "efficientnet_lite0"])
def test_eigencam_matches_reference_projection(model_name, request, resnet20, cifar_batch):
    if model_name == "resnet20":
        model, x, layer = resnet20, cifar_batch, "layer3"
    else:
        model = request.getfixturevalue("efficientnet_lite0")
        x, layer = request.getfixturevalue("coco_batch"), "_bn1"

    captured = {}
    handle = model.get_submodule(layer).register_forward_hook(
        lambda m, i, o: captured.setdefault("a", o.detach())
    )
    with torch.no_grad():
        model(x)
    handle.remove()
    ref = np.maximum(get_2d_projection_with_sign_correction(captured["a"].numpy()), 0)
    ours = _ours(model, "eigencam", layer, x, torch.zeros(len(x), dtype=torch.long)).numpy()
    corrs = [_pearson(o, r) for o, r in zip(ours, ref)]
    assert min(corrs) >= 0.99, corrs


def test_guided_backprop_matches_reference(resnet20, cifar_batch):
    x = cifar_batch[:8]
    with torch.no_grad():
        classes = resnet20(x).argmax(1)
    from cam_plugin.cams.guided import guided_backprop

    ours = guided_backprop(resnet20, x, classes[:, None])[:, 0].numpy()
    ref_model = pgc.GuidedBackpropReLUModel(resnet20, device="cpu")
    for i in range(len(x)):
        ref = ref_model(x[i : i + 1], target_category=int(classes[i]))  # (H, W, 3)
        assert _pearson(ours[i], np.abs(ref).max(axis=2)) >= 0.99


def test_cam_equals_gradcam_on_gap_linear_head(resnet20, cifar_batch):
    with torch.no_grad():
        classes = resnet20(cifar_batch).argmax(1)
    cam = _ours(resnet20, "cam", "layer3", cifar_batch, classes)
    grad = _ours(resnet20, "gradcam", "layer3", cifar_batch, classes)
    # Grad-CAM's mean gradient on a GAP + linear head is the class weight
    # divided by the grid size, so the maps agree up to that factor
    h, w = cam.shape[-2:]
    assert torch.allclose(grad * (h * w), cam, rtol=1e-4, atol=1e-5)
    assert min(_pearson(a, b) for a, b in zip(cam, grad)) >= 0.99


def test_counterfactual_is_gradcam_of_negated_gradients(resnet20, cifar_batch):
    with torch.no_grad():
        classes = resnet20(cifar_batch).argmax(1)
    counter = _ours(resnet20, "gradcam-counterfactual", "layer3", cifar_batch, classes)
    ex = CamExtractor(resnet20, "gradcam", (3, 32, 32), layer="layer3")
    ctx_check = ex(cifar_batch, {"t": lambda logits: classes})
    assert counter.shape == ctx_check.maps[:, 0].shape
    # a channel never weighs both for and against the class
    both = (counter > 0) & (ctx_check.maps[:, 0] > 0)
    assert counter.sum() > 0 and both.float().mean() < 0.5


def test_randomised_weights_change_gradcam(resnet20_path, cifar_batch):
    """Adebayo et al. (2018): an explanation that survives randomising the
    model explains nothing. Grad-CAM must change."""
    trained = load_resnet20_checkpoint(resnet20_path)
    randomised = load_resnet20_checkpoint(resnet20_path)
    torch.manual_seed(0)
    for module in randomised.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.reset_parameters()

    with torch.no_grad():
        classes = trained(cifar_batch).argmax(1)
    a = _ours(trained, "gradcam", "layer3", cifar_batch, classes)
    b = _ours(randomised, "gradcam", "layer3", cifar_batch, classes)
    rhos = [_spearman(x, y) for x, y in zip(a, b) if x.std() > 0 and y.std() > 0]
    assert len(rhos) >= 15
    assert np.mean(rhos) < 0.5, rhos


class _DictOutput(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return {"logits": self.inner(x), "aux": x.mean()}


class _ObjectOutput(_DictOutput):
    def forward(self, x):
        class Out:
            pass

        out = Out()
        out.logits = self.inner(x)
        return out


@pytest.mark.parametrize("wrapper", [_DictOutput, _ObjectOutput])
def test_dict_and_object_outputs(wrapper, resnet20, cifar_batch):
    plain = _ours(resnet20, "gradcam", "layer3", cifar_batch[:4], torch.arange(4))
    wrapped = _ours(wrapper(resnet20), "gradcam", "inner.layer3", cifar_batch[:4], torch.arange(4))
    assert torch.allclose(plain, wrapped)


def test_scorecam_passes_are_batched(resnet20, cifar_batch):
    ex = CamExtractor(resnet20, "scorecam", (3, 32, 32), layer="layer3", chunk_size=128)
    calls = []

    # masked passes run on an inference copy of the model, so count the
    # classifier head's calls in any module
    def count(module, args):
        if isinstance(module, torch.nn.Linear):
            calls.append(args[0].shape[0])

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        ex(cifar_batch, {"t": lambda logits: torch.zeros(20, dtype=torch.long)})
    finally:
        handle.remove()
    # 20 images x 64 channels: the reference runs 80 passes of 16 images;
    # here one main pass, one black image, then full chunks of 128 (in any
    # order: on CPU the chunks run in parallel streams)
    main, black, masked = calls[0], calls[1], sorted(calls[2:], reverse=True)
    assert (main, black) == (20, 1)
    assert sum(masked) <= 20 * 64
    assert masked[:-1] == [128] * (len(masked) - 1)


ARCHITECTURES = [
    "resnet18",
    "vgg11",
    "densenet121",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "convnext_tiny",
    "vit_b_16",
    "swin_t",
]


@pytest.fixture(scope="module")
def two_images(tmp_path_factory, coco_dir):
    src = sorted((Path(coco_dir) / "images").glob("*.jpg"))[:2]
    return [str(p) for p in src]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_architecture_without_a_layer_argument(name, two_images, dataset_name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    with torch.no_grad():
        # random weights, but no zero-initialised head (torchvision's ViT
        # has one): with it every class score is constant and every map 0
        for p in model.parameters():
            if p.numel() > 1 and not torch.any(p):
                p.normal_(0, 0.02)
    transforms = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    clf = cam_plugin.Classifier(model, transforms, None, name)
    dataset = fo.Dataset(dataset_name)
    dataset.add_samples([fo.Sample(filepath=p) for p in two_images])
    summary = cam_plugin.compute_cams(dataset, clf, heatmap_size=64, num_workers=0)
    assert summary.processed == 2, summary
    layer = cam_plugin.get_run(dataset, "cam")["layer"]
    for path in dataset.values("cam.map_path"):
        levels = np.asarray(Image.open(path), dtype=np.float64)
        assert levels.std() > 0, (name, layer)


def test_pgc_backend_by_name(resnet20, cifar_batch):
    maps = _ours(resnet20, "pgc:EigenGradCAM", "layer3", cifar_batch[:4], torch.arange(4))
    assert maps.shape == (4, 32, 32) and maps.max() > 0

    with pytest.raises(cam_plugin.CamError, match="has no method 'NoSuchCAM'"):
        _ours(resnet20, "pgc:NoSuchCAM", "layer3", cifar_batch[:4], torch.arange(4))
