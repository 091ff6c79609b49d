"""The fast path of the perturbation methods' masked passes: the inference
copy (folded batch norms, in-place ReLUs, channels-last) computes what the
model computes, never touches the user's model, follows weight changes, and
the side-by-side CPU streams leave torch's thread count as they found it."""

import torch
import torch.nn.functional as F
import torchvision

from cam_plugin.cams import CamExtractor
from cam_plugin.cams.inference import InferenceModels, inference_copy
from cam_plugin.cifar_resnet import resnet20

CPU = torch.device("cpu")


class ViewsAndSharing(torch.nn.Module):
    """ReLUs whose inputs are views or are read twice: making any of them
    in place would change the output."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.relu_shared = torch.nn.ReLU()
        self.relu_view = torch.nn.ReLU()
        self.head = torch.nn.Linear(8 * 8 * 8, 4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        a = self.relu_shared(y) + y  # y is read again after the ReLU
        flat = a.flatten(1)
        b = self.relu_view(flat[:, : flat.shape[1]])  # a view of flat
        return self.head(b + flat)


def _trained_bn(model, size=32):
    # non-trivial running statistics, so folding them is really tested
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, size, size) * 2 + 0.5)
    return model.eval()


def test_inference_copy_computes_the_same_logits_and_leaves_the_model_alone():
    torch.manual_seed(0)
    copies = []
    for model, size in ((torchvision.models.resnet18(num_classes=10), 32), (ViewsAndSharing(), 8)):
        model = _trained_bn(model, size)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        x = torch.randn(6, 3, size, size)
        with torch.no_grad():
            expected = model(x)

        fast, memory_format = inference_copy(model, CPU)
        assert fast is not model
        assert memory_format == torch.channels_last
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules()), "batch norms not folded"
        with torch.no_grad():
            got = fast(x.contiguous(memory_format=memory_format))

        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        for name, value in model.state_dict().items():
            assert torch.equal(value, before[name]), name
            assert value.is_contiguous(), f"{name} changed memory format"
        copies.append((model, fast))

    # the ReLUs of the views model read views or shared tensors: they must
    # stay out of place, in the copy and in the original
    views_model, views_copy = copies[1]
    assert not any(getattr(m, "inplace", False) for m in views_model.modules())
    assert not any(getattr(m, "inplace", False) for m in views_copy.modules())


def test_inference_copy_follows_weight_changes():
    torch.manual_seed(0)
    model = _trained_bn(torchvision.models.resnet18(num_classes=10))
    cache = InferenceModels(model)
    first, _ = cache.get(CPU)
    assert cache.get(CPU)[0] is first

    with torch.no_grad():
        model.fc.weight.mul_(-1)
    second, fmt = cache.get(CPU)
    assert second is not first
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(second(x.contiguous(memory_format=fmt)), model(x), rtol=1e-4, atol=1e-4)


def test_scorecam_streams_restore_thread_count_and_match_one_stream():
    torch.manual_seed(0)
    model = _trained_bn(resnet20())
    x = torch.randn(3, 3, 32, 32)
    targets = {"pred": lambda logits: logits.argmax(1)}

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        extractor = CamExtractor(model, "scorecam", (3, 32, 32), chunk_size=16)
        streamed = extractor(x, targets).maps
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        single = CamExtractor(model, "scorecam", (3, 32, 32), chunk_size=16)(x, targets).maps
    finally:
        torch.set_num_threads(threads)

    assert extractor.layer == "layer3" and streamed.shape[-2:] == (8, 8)
    assert streamed.flatten(1).amax(1).min() > 0
    torch.testing.assert_close(streamed, single, rtol=1e-4, atol=1e-6)

    # and both equal Score-CAM computed from its definition on the model itself
    reference = _scorecam_by_definition(model, "layer3", x, 0)
    torch.testing.assert_close(single[:1], reference, rtol=1e-3, atol=1e-5)


def _scorecam_by_definition(model, layer, x, i):
    """Score-CAM for image ``i``, one masked pass at a time on the model
    itself."""
    acts = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, inp, o: acts.setdefault("a", o))
    with torch.no_grad():
        cls = model(x[i : i + 1]).argmax(1).item()
        handle.remove()
        a = acts["a"][0]
        scores = []
        for channel in a:
            up = F.interpolate(channel[None, None], size=x.shape[-2:], mode="bilinear", align_corners=True)[0, 0]
            mask = (up - up.min()) / (up.max() - up.min() + 1e-8)
            scores.append(model(x[i : i + 1] * mask)[0, cls])
        weights = torch.softmax(torch.stack(scores), 0)
        return F.relu((weights[:, None, None] * a).sum(0))[None, None]


def test_relus_reading_fresh_outputs_run_in_place_in_the_copy():
    model = _trained_bn(resnet20())
    fast, _ = inference_copy(model, CPU)
    relus = [m for m in fast.modules() if isinstance(m, torch.nn.ReLU)]
    assert relus and all(m.inplace for m in relus)
    assert not any(m.inplace for m in model.modules() if isinstance(m, torch.nn.ReLU))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
