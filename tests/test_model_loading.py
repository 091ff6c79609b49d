"""Model files are loaded without running code from them.

A crafted pickle whose unpickling writes a marker file is refused by every
way a model path comes in: the Python API, the layer listings (including
``model_layers``, which the App's form uses, since it is resolved before
the user runs anything), the form itself and the operator;
the marker never appears. Only an explicit ``trust_checkpoint=True`` from
Python unpickles a whole model. The shared CIFAR ResNet-20 checkpoint, a
plain pickle of tensors, keeps loading without any trust flag.
"""

import contextlib
import pickle
import re
from pathlib import Path

import fiftyone.operators as foo
import pytest
import torch
import torchvision
from PIL import Image

import cam_plugin
from builders import cifar_dataset, resolve_form
from builders import form_errors as _errors
from cam_plugin import ModelError, load_classifier
from cam_plugin.cams.torchscript import HookableScriptModule
from cam_plugin.cifar_resnet import CIFAR10_CLASSES, resnet20

COMPUTE_CAMS = "@cam-plugin/cam/compute_cams"
REFUSED = "would run code from the file"


class _WritesMarker:
    """Unpickles by calling ``exec``, which writes the marker file: what a
    crafted checkpoint can do with any code at all."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code from the file ran')",)


def _crafted(path, marker, kind):
    """Writes a file whose full unpickling creates ``marker``: a training
    checkpoint in torch's zip format or its legacy format, or a bare pickle."""
    payload = {"state_dict": _WritesMarker(marker), "best_prec1": 90.0}
    if kind == "zip":
        torch.save(payload, path)
    elif kind == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    return path


@pytest.fixture(params=["zip", "legacy", "pickle"])
def crafted(request, tmp_path):
    """(crafted file, the marker its unpickling would write)."""
    marker = tmp_path / "marker"
    path = _crafted(tmp_path / f"crafted-{request.param}.pt", marker, request.param)
    yield path, marker
    assert not marker.exists(), "code from the crafted file ran"


def _specs(path):
    return [str(path), f"cifar10_resnet20:{path}", f"resnet18:{path}"]


def test_the_crafted_files_do_run_code_when_fully_unpickled(tmp_path):
    # what the other tests guard against is real: torch.load without
    # weights_only runs the file's code
    for kind in ("zip", "legacy", "pickle"):
        marker = tmp_path / f"marker-{kind}"
        path = _crafted(tmp_path / f"{kind}.pt", marker, kind)
        # torch reads a bare pickle as its legacy format's magic number
        # (running it) and only then finds that it is no checkpoint
        with contextlib.suppress(RuntimeError):
            torch.load(path, weights_only=False)
        assert marker.read_text() == "code from the file ran", kind


def test_load_classifier_refuses_a_crafted_pickle(crafted):
    path, _ = crafted
    for spec in _specs(path):
        with pytest.raises(ModelError, match=REFUSED) as info:
            load_classifier(spec)
        message = str(info.value)
        # the message says what to do instead
        assert "TorchScript" in message and "state_dict" in message, message
        assert "trust_checkpoint=True" in message, message


def test_layer_candidates_refuses_a_crafted_pickle(crafted):
    path, _ = crafted
    for spec in _specs(path):
        with pytest.raises(ModelError, match=REFUSED):
            cam_plugin.layer_candidates(spec)


def test_model_layers_never_load_the_file(crafted):
    # what the App's form lists its layers with
    path, _ = crafted
    with pytest.raises(ModelError, match=REFUSED) as info:
        cam_plugin.model_layers(str(path))
    assert "not a TorchScript file" in str(info.value), info.value

    # with an architecture the layers come from the architecture alone: had
    # the file been loaded, even safely, it would have been refused
    names, default = cam_plugin.model_layers(f"cifar10_resnet20:{path}")
    assert default == "layer3"
    assert names[0] == "layer3"
    names, default = cam_plugin.model_layers(f"resnet18:{path}")
    assert default == "layer4"


@pytest.fixture
def dataset(dataset_name, cifar_dir):
    return cifar_dataset(dataset_name, cifar_dir, per_class=1)


def _form(dataset, **params):
    """The compute_cams form as the App resolves it, as JSON properties."""
    return resolve_form(COMPUTE_CAMS, dataset, **params)


def test_the_app_form_never_loads_a_crafted_pickle(crafted, dataset):
    path, _ = crafted

    # a model file without an architecture is refused by looking at it
    props = _form(dataset, model_source="file", model_path=str(path))
    error = _errors(props)["model_path"]
    assert "nor a TorchScript file" in error and REFUSED in error, error
    assert "target_layer" not in props

    # the same file as a complete specification from Python
    props = _form(dataset, model=str(path))
    assert REFUSED in props["layer_error"]["view"]["description"]

    # with its architecture named, the layer dropdown is filled from the
    # architecture alone
    for architecture, default in (("cifar10_resnet20", "layer3"), ("resnet18", "layer4")):
        props = _form(dataset, model_source="file", model_path=str(path), architecture=architecture)
        assert _errors(props) == {}
        assert props["target_layer"]["default"] == default
        # and as a complete specification from Python
        props = _form(dataset, model=f"{architecture}:{path}")
        assert "layer_error" not in props and _errors(props) == {}
        assert props["target_layer"]["default"] == default


def test_the_operator_refuses_a_crafted_pickle(crafted, dataset):
    path, _ = crafted
    params = dict(model=f"cifar10_resnet20:{path}", batch_size=4, device="cpu")
    result = foo.execute_operator(COMPUTE_CAMS, ctx=dict(dataset=dataset, params=params))
    # the App is told why, in one sentence, as an error notification
    (notice,) = [r.params for r in result.executor._requests if r.operator_uri.endswith("notify")]
    assert notice["variant"] == "error"
    assert re.search(REFUSED, notice["message"]), notice["message"]
    dataset.reload()
    assert "cam_prediction" not in dataset.get_field_schema()


def test_a_pickled_model_loads_only_when_trusted(tmp_path):
    torch.manual_seed(0)
    model = resnet20().eval()
    path = tmp_path / "whole-model.pt"
    torch.save(model, path)

    with pytest.raises(ModelError, match=REFUSED) as info:
        load_classifier(path)
    # torch names what the file would have run
    assert "cam_plugin.cifar_resnet.CifarResNet" in str(info.value)
    with pytest.raises(ModelError, match="not a TorchScript file"):
        cam_plugin.model_layers(str(path))

    clf = load_classifier(path, transforms=torchvision.transforms.ToTensor(), trust_checkpoint=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clf.module(x), model(x))
    names, default = cam_plugin.layer_candidates(
        path, transforms=torchvision.transforms.ToTensor(), trust_checkpoint=True
    )
    assert default == "layer3"

    # a trusted pickled model also serves as the checkpoint of its architecture
    clf = load_classifier(f"cifar10_resnet20:{path}", trust_checkpoint=True)
    with torch.no_grad():
        torch.testing.assert_close(clf.module(x), model(x))


def test_state_dict_checkpoints_load_without_trust(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    # a training checkpoint as DataParallel writes it, in the legacy format
    wrapped = tmp_path / "wrapped.th"
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, wrapped, _use_new_zipfile_serialization=False)

    for path in (bare, wrapped):
        clf = load_classifier(f"resnet18:{path}")
        with torch.no_grad():
            torch.testing.assert_close(clf.module(x), model(x))

    # a state dict needs its architecture
    with pytest.raises(ModelError, match="name its architecture"):
        load_classifier(bare)


def test_torchscript_files_and_modules_are_inspected_and_loaded(tmp_path):
    torch.manual_seed(0)
    model = resnet20().eval()
    scripted = torch.jit.script(model)
    path = tmp_path / "resnet20.pt"
    torch.jit.save(scripted, str(path))

    names, default = cam_plugin.model_layers(str(path))
    assert default == "layer3"

    x = torch.randn(2, 3, 32, 32)
    for source in (path, scripted):
        clf = load_classifier(source)
        assert isinstance(clf.module, HookableScriptModule)
        with torch.no_grad():
            torch.testing.assert_close(clf.module(x), model(x))


def test_random_cifar_resnet20_needs_no_checkpoint():
    clf = load_classifier("cifar10_resnet20:none")
    assert clf.classes == CIFAR10_CLASSES
    assert cam_plugin.layer_candidates(clf)[1] == "layer3"
    with pytest.raises(ModelError, match="needs its checkpoint"):
        load_classifier("cifar10_resnet20")


def test_the_shared_resnet20_checkpoint_loads_safely_and_predicts(resnet20_path, cifar_dir):
    # an old pickle of {'state_dict', 'best_prec1'}: tensors, an OrderedDict
    # and a float, all of which weights_only=True restores
    checkpoint = torch.load(resnet20_path, map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"state_dict", "best_prec1"}

    clf = load_classifier(f"cifar10_resnet20:{resnet20_path}")
    assert clf.classes == CIFAR10_CLASSES
    assert cam_plugin.layer_candidates(f"cifar10_resnet20:{resnet20_path}")[1] == "layer3"

    files = [(p, d.name) for d in sorted(Path(cifar_dir).iterdir()) for p in sorted(d.glob("*.jpg"))[:10]]
    batch = torch.stack([clf.transforms(Image.open(p).convert("RGB")) for p, _ in files])
    with torch.no_grad():
        predicted = [clf.classes[i] for i in clf.module(batch).argmax(1)]
    accuracy = sum(p == label for p, (_, label) in zip(predicted, files)) / len(files)
    # 0.804 on all 1,000 images (tests/test_pretrained.py)
    assert accuracy >= 0.75, accuracy
