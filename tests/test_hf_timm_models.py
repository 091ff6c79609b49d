"""Hugging Face Transformers and timm classifiers as compute_cams models,
built offline from tiny configs with random, seeded weights: their default
target layers, their maps against pytorch-grad-cam's with the equivalent
reshape_transform, their classes, image processors translated into
torchvision transforms that produce the processor's tensor and place maps
in the full image frame, the "hf:" and "timm:" strings, and the messages
when either package is missing. Nothing is downloaded: the Hub is offline
for the whole module."""

import ast
import os
import sys
from pathlib import Path

# before transformers and huggingface_hub read it on import
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import cam_plugin  # noqa: E402
from cam_plugin.cams import CamExtractor  # noqa: E402
from cam_plugin.frames import frame_size, input_window, probe_window  # noqa: E402
from cam_plugin.heatmaps import read_heatmap  # noqa: E402

tr = pytest.importorskip("transformers", reason="transformers is a test dependency (pip install transformers)")
timm = pytest.importorskip("timm", reason="timm is a test dependency (pip install timm)")
pgc = pytest.importorskip("pytorch_grad_cam", reason="grad-cam is a test dependency")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

from builders import cifar_dataset  # noqa: E402
from cam_plugin import hf_models, timm_models  # noqa: E402
from test_methods import _pearson, _to_input_grid  # noqa: E402

CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
ID2LABEL = dict(enumerate(CIFAR))
TINY_VIT = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    num_labels=len(CIFAR),
    id2label=ID2LABEL,
    label2id={n: i for i, n in ID2LABEL.items()},
)


@pytest.fixture(autouse=True)
def hub_offline(monkeypatch):
    # whatever read the variable first: no request leaves the machine
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def cifar_images(cifar_dir):
    """Eight real CIFAR-10 images (32 x 32), of eight classes."""
    dirs = sorted(p for p in Path(cifar_dir).iterdir() if p.is_dir())[:8]
    return [Image.open(sorted(d.glob("*.jpg"))[0]).convert("RGB") for d in dirs]


def _seeded(build):
    torch.manual_seed(0)
    return build().eval()


class _Logits(torch.nn.Module):
    # pytorch-grad-cam indexes the model's output: a Transformers model
    # returns an output object, so the reference sees its logits
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


def _tokens_to_grid(extra, h, w):
    # the reshape_transform of pytorch-grad-cam's ViT and Swin tutorials:
    # leading (class, distillation) tokens dropped, the rest an h x w grid
    def reshape(t):
        t = t[:, extra:, :].reshape(t.shape[0], h, w, t.shape[2])
        return t.permute(0, 3, 1, 2)

    return reshape


def _compare_with_reference(clf, x, reshape, wrap=False):
    """Our Grad-CAM at the classifier's default layer against
    pytorch-grad-cam's: the default layer, and the Pearson of each map."""
    model = clf.module
    with torch.no_grad():
        classes = cam_plugin.cams.capture.logits_of(model(x)).argmax(1)

    # the layer a run takes when it names none
    ex = CamExtractor(model, "gradcam", tuple(x.shape[1:]), layer=clf.target_layer)
    default = ex.layer
    ours = ex(x, {"t": lambda logits: classes}).maps[:, 0]
    assert torch.isfinite(ours).all()
    # random weights: an image whose evidence is negative everywhere has
    # an all-zero map after the ReLU (pytorch-grad-cam's too), but most
    # maps must show structure
    varied = [float(m.std()) > 0 for m in ours]
    assert sum(varied) >= 0.75 * len(varied), f"degenerate (constant) maps: {varied}"
    ours = _to_input_grid(ours, x.shape[-2:])

    ref_model = _Logits(model) if wrap else model
    targets = [ClassifierOutputTarget(int(c)) for c in classes]
    with pgc.GradCAM(
        model=ref_model, target_layers=[model.get_submodule(default)], reshape_transform=reshape
    ) as ref:
        reference = ref(input_tensor=x, targets=targets)
    corrs = [_pearson(o, r) for o, r in zip(ours, reference)]
    print(f"{clf.name} at {default} ({ex.layout.describe()}): Pearson min {min(corrs):.6f} mean {np.mean(corrs):.6f}")
    assert min(corrs) >= 0.99, corrs
    return default, ex.layout


def _batch(transforms, images):
    return torch.stack([transforms(im) for im in images])


# --- Hugging Face ---------------------------------------------------------


def test_hf_vit_default_layer_classes_and_maps(cifar_images):
    model = _seeded(lambda: tr.ViTForImageClassification(tr.ViTConfig(**TINY_VIT)))
    processor = tr.ViTImageProcessor(size={"height": 32, "width": 32})
    clf = cam_plugin.load_classifier((model, processor))

    assert clf.classes == CIFAR
    last = [n for n, _ in model.named_modules() if n.endswith("layernorm_before")][-1]
    # Transformers 5 names the blocks vit.layers.<i>, 4 vit.encoder.layer.<i>
    assert clf.target_layer == last and last.endswith("1.layernorm_before")
    # the generic probe would pick the last block's value projection,
    # after the attention has read the patch tokens into the class token
    candidates = cam_plugin.cams.probe_layers(model, (3, 32, 32))
    assert cam_plugin.cams.default_layer(candidates) != last

    x = _batch(clf.transforms, cifar_images)
    layer, layout = _compare_with_reference(clf, x, _tokens_to_grid(1, 4, 4), wrap=True)
    assert layer == last
    assert (layout.kind, layout.grid, layout.extra_tokens) == ("tokens", (4, 4), 1)


def test_hf_deit_distilled_drops_both_leading_tokens(cifar_images):
    model = _seeded(lambda: tr.DeiTForImageClassificationWithTeacher(tr.DeiTConfig(**TINY_VIT)))
    processor = tr.DeiTImageProcessor(size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32})
    clf = cam_plugin.load_classifier(model, transforms=processor)
    assert clf.classes == CIFAR
    assert clf.target_layer.endswith("1.layernorm_before")
    x = _batch(clf.transforms, cifar_images[:4])
    _, layout = _compare_with_reference(clf, x, _tokens_to_grid(2, 4, 4), wrap=True)
    assert layout.extra_tokens == 2


def test_hf_convnext_default_layer_and_maps(cifar_images):
    config = tr.ConvNextConfig(
        hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_labels=len(CIFAR), id2label=ID2LABEL
    )
    model = _seeded(lambda: tr.ConvNextForImageClassification(config))
    # ConvNeXt's own rule: the short side to 64 / crop_pct, then a crop
    processor = tr.ConvNextImageProcessor(size={"shortest_edge": 64})
    clf = cam_plugin.load_classifier((model, processor))
    assert clf.classes == CIFAR
    # the generic probe's pick, the last stage, is right for ConvNeXt
    assert clf.target_layer is None
    x = _batch(clf.transforms, cifar_images)
    assert x.shape[-2:] == (64, 64)
    layer, layout = _compare_with_reference(clf, x, None, wrap=True)
    assert layer == "convnext.encoder.stages.3"
    assert (layout.kind, layout.grid) == ("nchw", (2, 2))


def test_hf_swin_default_layer_and_maps(cifar_images):
    config = tr.SwinConfig(
        image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
        window_size=4, num_labels=len(CIFAR), id2label=ID2LABEL,
    )
    model = _seeded(lambda: tr.SwinForImageClassification(config))
    clf = cam_plugin.load_classifier((model, tr.ViTImageProcessor(size={"height": 64, "width": 64})))
    assert clf.target_layer is None
    x = _batch(clf.transforms, cifar_images[:4])
    layer, layout = _compare_with_reference(clf, x, _tokens_to_grid(0, 8, 8), wrap=True)
    # the final norm's token grid (the window attention's projections,
    # batched by window, are no maps)
    assert layer == "swin.layernorm"
    assert (layout.kind, layout.grid, layout.extra_tokens) == ("tokens", (8, 8), 0)


def test_hf_placeholder_labels_are_no_names():
    config = tr.ViTConfig(**{k: v for k, v in TINY_VIT.items() if k not in ("id2label", "label2id")})
    model = _seeded(lambda: tr.ViTForImageClassification(config))
    clf = cam_plugin.load_classifier(model)
    # LABEL_0 ... are Transformers' fill-ins, not class names
    assert clf.classes is None
    # without a processor: ImageNet preprocessing at the config's size
    assert cam_plugin.models.input_shape_of(clf.transforms) == (3, 32, 32)

    with pytest.raises(cam_plugin.ModelError, match="not a Hugging Face image classifier"):
        cam_plugin.load_classifier(tr.ViTModel(config))


PROCESSORS = {
    "vit_warp": lambda: tr.ViTImageProcessor(size={"height": 32, "width": 48}),
    "deit_resize_crop": lambda: tr.DeiTImageProcessor(
        size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32}
    ),
    "convnext_crop_pct": lambda: tr.ConvNextImageProcessor(size={"shortest_edge": 64}),
    "convnext_warp": lambda: tr.ConvNextImageProcessor(size={"shortest_edge": 384}),
    "bit_shortest_edge_crop": lambda: tr.BitImageProcessor(
        size={"shortest_edge": 48}, crop_size={"height": 40, "width": 40}
    ),
    "rescale_only": lambda: tr.ViTImageProcessor(
        size={"height": 32, "width": 32}, do_normalize=False, rescale_factor=1 / 127.5
    ),
    "pil_backend": lambda: tr.models.vit.image_processing_pil_vit.ViTImageProcessorPil(
        size={"shortest_edge": 40}, do_center_crop=True, crop_size={"height": 32, "width": 32}
    ),
}


@pytest.mark.parametrize("kind", sorted(PROCESSORS))
def test_processor_as_torchvision_transforms(kind):
    if kind == "pil_backend" and not hasattr(tr.models.vit, "image_processing_pil_vit"):
        pytest.skip("this transformers has no PIL-backend ViT processor")
    processor = PROCESSORS[kind]()
    transforms = hf_models.processor_transforms(processor)
    # translated, not the processor wrapped
    assert not isinstance(transforms, hf_models.ProcessorTransforms), transforms

    # the processor's tensor, for sides odd and even, landscape and
    # portrait, smaller and larger than the crop
    for width, height in ((83, 61), (61, 83), (200, 150), (30, 29)):
        image = hf_models.test_image(width, height, seed=width)
        ours = transforms(image)
        theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
        assert ours.shape == theirs.shape
        assert torch.allclose(ours, theirs.float(), atol=1e-4), (width, height, (ours - theirs).abs().max())

    # and its window is the one probing the processor itself finds
    for width, height in ((200, 150), (97, 131)):
        exact = input_window(transforms, width, height).as_tuple()
        probed = probe_window(hf_models.ProcessorTransforms(processor), width, height).as_tuple()
        assert np.allclose(exact, probed, atol=0.5 + max(width, height) / 255), (exact, probed)


def test_untranslatable_processor_is_used_as_it_is():
    # EfficientNet's processor has its own steps: the check against the
    # processor refuses the translation, and the processor runs itself
    processor = tr.EfficientNetImageProcessor(
        size={"height": 50, "width": 50}, crop_size={"height": 40, "width": 40}, do_center_crop=True
    )
    transforms = hf_models.processor_transforms(processor)
    assert isinstance(transforms, hf_models.ProcessorTransforms)
    image = hf_models.test_image()
    theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(transforms(image), theirs.float())
    window = input_window(transforms, 200, 150).as_tuple()
    assert np.allclose(window, (20, 15, 180, 135), atol=1.5), window


def test_compute_cams_with_a_hf_model_end_to_end(dataset_name, cifar_dir):
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    dataset.compute_metadata()
    model = _seeded(lambda: tr.ViTForImageClassification(tr.ViTConfig(**TINY_VIT)))
    # the short side to 40, a 32 x 32 crop: the model sees the window
    # (3.2, 3.2, 28.8, 28.8) of each 32 x 32 image
    processor = tr.ViTImageProcessor(
        size={"shortest_edge": 40}, do_center_crop=True, crop_size={"height": 32, "width": 32}
    )

    with pytest.raises(cam_plugin.RunError, match="'hf:<repo id>'"):
        cam_plugin.compute_cams(dataset, (model, processor), delegate=True)

    summary = cam_plugin.compute_cams(
        dataset, (model, processor), label_field="ground_truth", heatmap_size=64,
        batch_size=4, num_workers=0, device="cpu",
    )
    assert summary.processed == len(dataset) == 10 and not summary.failed, summary

    run = cam_plugin.get_run(dataset, "cam")
    assert run["layer"].endswith("1.layernorm_before")
    assert run["classes"] == CIFAR
    # the model's own predictions, named by id2label
    with torch.no_grad():
        clf = cam_plugin.load_classifier((model, processor))
        images = [Image.open(p).convert("RGB") for p in dataset.values("filepath")]
        expected = [CIFAR[i] for i in model(_batch(clf.transforms, images)).logits.argmax(1)]
    assert dataset.values("cam_prediction.label") == expected

    window = input_window(clf.transforms, 32, 32).as_tuple()
    assert np.allclose(window, (3.2, 3.2, 28.8, 28.8), atol=1e-6), window
    for sample in dataset.select_fields(["cam", "cam_gt", "metadata"]):
        for field in ("cam", "cam_gt"):
            levels = read_heatmap(sample[field])
            out_w, out_h = frame_size(sample.metadata.width, sample.metadata.height, 64)
            # the full image frame, zero outside the model's window
            assert levels.shape == (out_h, out_w) == (32, 32)
            if field == "cam":
                # (random weights: a ground-truth class's map may be all
                # negative evidence, zero after the ReLU)
                assert levels[3:29, 3:29].std() > 0, sample.filepath
            assert levels[:3].max() == 0 and levels[29:].max() == 0
            assert levels[:, :3].max() == 0 and levels[:, 29:].max() == 0


def test_hf_strings_load_from_a_directory_and_never_download(tmp_path):
    model = _seeded(lambda: tr.ViTForImageClassification(tr.ViTConfig(**TINY_VIT)))
    processor = tr.DeiTImageProcessor(size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    clf = cam_plugin.load_classifier(f"hf:{tmp_path}")
    assert clf.classes == CIFAR and clf.name == f"hf:{tmp_path}"
    assert clf.fingerprint == cam_plugin.models.weights_fingerprint(model)
    assert clf.target_layer.endswith("1.layernorm_before")
    assert input_window(clf.transforms, 40, 40).as_tuple() == (4, 4, 36, 36)

    # the form's layer list: from the config, random weights
    assert cam_plugin.models.layer_probe_spec(f"hf:{tmp_path}") == (f"hf:{tmp_path}:none", None)
    names, default = cam_plugin.model_layers(f"hf:{tmp_path}")
    assert default == clf.target_layer and default in names

    # an id never loaded: refused, saying why, with nothing downloaded
    with pytest.raises(cam_plugin.ModelError, match="not in the local Hugging Face cache"):
        cam_plugin.model_layers("hf:cam-plugin-tests/never-downloaded")
    with pytest.raises(cam_plugin.ModelError, match="Could not load the Hugging Face model"):
        cam_plugin.load_classifier("hf:cam-plugin-tests/never-downloaded")
    with pytest.raises(cam_plugin.ModelError, match="Name the Hugging Face model"):
        cam_plugin.load_classifier("hf:")


# --- timm -----------------------------------------------------------------


def test_timm_vit_default_layer_and_maps(cifar_images):
    model = _seeded(
        lambda: timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8,
            embed_dim=32, depth=2, num_heads=2, num_classes=5,
        )
    )
    clf = cam_plugin.load_classifier(model)
    assert clf.target_layer == "blocks.1.norm1"
    assert clf.classes is None  # 5 outputs: no pretrained names fit
    assert clf.name == "timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    # the model's own input size (its pretrained config says 224)
    assert cam_plugin.models.input_shape_of(clf.transforms) == (3, 64, 64)
    # timm's resize and crop (64 / 0.9 = 71, then 64): an exact window
    # (torchvision's crop rounds 3.5 to 4)
    assert input_window(clf.transforms, 71, 71).as_tuple() == (4, 4, 68, 68)

    x = _batch(clf.transforms, cifar_images)
    layer, layout = _compare_with_reference(clf, x, _tokens_to_grid(1, 8, 8))
    assert layer == "blocks.1.norm1"
    assert (layout.kind, layout.grid, layout.extra_tokens) == ("tokens", (8, 8), 1)


def test_timm_resnet_default_layer_and_maps(cifar_images):
    # a 96 input, set as a pretrained config would, keeps the test fast
    model = _seeded(
        lambda: timm.create_model(
            "resnet18", pretrained=False, num_classes=5,
            pretrained_cfg_overlay=dict(input_size=(3, 96, 96)),
        )
    )
    clf = cam_plugin.load_classifier(model)
    assert clf.target_layer is None  # the probe's layer4 is right
    assert clf.classes is None
    x = _batch(clf.transforms, cifar_images[:2])
    assert x.shape[-2:] == (96, 96)
    layer, layout = _compare_with_reference(clf, x, None)
    assert layer == "layer4"
    assert (layout.kind, layout.grid) == ("nchw", (3, 3))


def test_timm_strings(monkeypatch):
    # random weights, nothing downloaded: the real model's layers,
    # transforms and ImageNet class names
    clf = cam_plugin.load_classifier("timm:resnet18:none")
    assert clf.classes == cam_plugin.imagenet_classes()
    assert clf.name == "timm:resnet18 (random weights)"
    assert cam_plugin.models.layer_probe_spec("timm:resnet18.a1_in1k") == ("timm:resnet18.a1_in1k:none", None)
    with pytest.raises(cam_plugin.ModelError, match="is not a timm model.*resnet18"):
        cam_plugin.load_classifier("timm:resnet18_not_a_model")

    # pretrained weights: a failed download says what to do (timm itself
    # is stopped before it reaches the network)
    create_model = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise RuntimeError("no network in this test")
        return create_model(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(cam_plugin.ModelError, match="Could not load the timm model.*'timm:resnet18:none'"):
        cam_plugin.load_classifier("timm:resnet18")


def test_timm_label_names_from_the_pretrained_config():
    model = _seeded(lambda: timm.create_model("resnet18", pretrained=False, num_classes=3))
    model.pretrained_cfg = dict(
        model.pretrained_cfg,
        label_names=["n1", "n2", "n3"],
        label_descriptions={"n1": "red fox, Vulpes vulpes", "n2": "kit fox", "n3": "grey fox"},
    )
    assert timm_models.timm_classes(model) == ["red fox", "kit fox", "grey fox"]


# --- optional packages ----------------------------------------------------


def test_optional_packages_are_imported_only_when_used(monkeypatch):
    # neither module imports its package at the top: importing cam_plugin
    # never needs them
    for module in (hf_models, timm_models, cam_plugin.models):
        tree = ast.parse(Path(module.__file__).read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top for a in n.names] + [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n.split(".")[0] in ("transformers", "timm")], module

    # without them, a clear message naming the package to install
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(cam_plugin.ModelError, match="pip install transformers"):
        cam_plugin.load_classifier("hf:google/vit-base-patch16-224")
    with pytest.raises(cam_plugin.ModelError, match="pip install timm"):
        cam_plugin.load_classifier("timm:resnet18")
    with pytest.raises(cam_plugin.ModelError, match="pip install timm"):
        cam_plugin.model_layers("timm:resnet50")
