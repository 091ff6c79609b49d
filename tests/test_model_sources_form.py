"""The compute_cams form's model sources besides torchvision and files: a
FiftyOne zoo classifier, a Hugging Face id or saved directory and a timm
name, resolved through FiftyOne's operator machinery as the App does. The
layer dropdown is filled from the chosen model without downloading
anything while the user is still choosing (a model whose layers need a
download gets the automatic layer, said in the form), and a run from the
form uses the model's own classes."""

import os

# before transformers and huggingface_hub read it on import
os.environ["HF_HUB_OFFLINE"] = "1"

import fiftyone.operators as foo  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import cam_plugin  # noqa: E402
from builders import cifar_dataset, resolve_form  # noqa: E402
from builders import form_errors as _errors  # noqa: E402

COMPUTE_CAMS = "@cam-plugin/cam/compute_cams"
CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def hub_offline(monkeypatch):
    # whatever read the variable first: no request leaves the machine
    hub = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def dataset(dataset_name, cifar_dir):
    return cifar_dataset(dataset_name, cifar_dir, per_class=1)


def _form(dataset, **params):
    return resolve_form(COMPUTE_CAMS, dataset, **params)


def _choices(prop):
    return [c["value"] for c in prop["view"]["choices"]]


def test_the_form_offers_every_model_source(dataset):
    props = _form(dataset)
    assert _choices(props["model_source"]) == ["torchvision", "zoo", "huggingface", "timm", "file"]


def test_a_zoo_classifier_gets_its_layers_without_a_download(dataset):
    import fiftyone as fo

    zoo_dir = fo.config.model_zoo_dir
    before = set(os.listdir(zoo_dir)) if os.path.isdir(zoo_dir) else set()

    props = _form(dataset, model_source="zoo")
    names = _choices(props["zoo_model"])
    assert "resnet18-imagenet-torch" in names and "resnet50-imagenet-torch" in names
    # only what zoo: can run (its torchvision classifiers)
    assert not any("clip" in n or "transformer" in n for n in names), names
    assert props["zoo_model"]["default"] == "resnet50-imagenet-torch"

    props = _form(dataset, model_source="zoo", zoo_model="resnet18-imagenet-torch")
    assert _errors(props) == {}
    assert props["target_layer"]["default"] == "layer4"
    # its class names, shown before anything runs
    assert props["model_classes"]["view"]["label"] == "Classes from the model: 1000"
    assert props["model_classes"]["view"]["description"].startswith("tench, goldfish")
    after = set(os.listdir(zoo_dir)) if os.path.isdir(zoo_dir) else set()
    assert after == before, "the form downloaded a zoo model"

    props = _form(dataset, model_source="zoo", zoo_model="yolov8n-coco-torch")
    assert "not one of the zoo's torchvision classifiers" in _errors(props)["zoo_model"]


def test_a_timm_name_is_completed_and_checked(dataset):
    pytest.importorskip("timm", reason="timm is a test dependency (pip install timm)")

    props = _form(dataset, model_source="timm", timm_model="resnet18.a1")
    choices = _choices(props["timm_model"])
    assert "resnet18.a1_in1k" in choices and all("resnet18.a1" in c for c in choices)
    props = _form(dataset, model_source="timm", timm_model="resnet18.a1_in1k")
    assert _errors(props) == {} and props["target_layer"]["default"] == "layer4"
    assert props["model_classes"]["view"]["label"] == "Classes from the model: 1000"

    props = _form(dataset, model_source="timm", timm_model="resnet18_but_not")
    assert "is not a timm model" in props["layer_error"]["view"]["description"]
    assert "target_layer" not in props


def test_a_hugging_face_model_from_the_form(dataset, tmp_path):
    tr = pytest.importorskip("transformers", reason="transformers is a test dependency")

    torch.manual_seed(0)
    config = tr.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=len(CIFAR),
        id2label=dict(enumerate(CIFAR)), label2id={n: i for i, n in enumerate(CIFAR)},
    )
    tr.ViTForImageClassification(config).save_pretrained(tmp_path)
    tr.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)

    # an id whose config was never downloaded: the form does not download
    # it, says the automatic layer will be used, and stays valid
    props = _form(dataset, model_source="huggingface", hf_model="someone/never-downloaded-vit")
    assert _errors(props) == {} and "target_layer" not in props
    assert "not in the local Hugging Face cache" in props["layer_notice"]["view"]["description"]

    props = _form(dataset, model_source="huggingface", hf_model="hf:google/vit-base-patch16-224")
    assert "without 'hf:'" in _errors(props)["hf_model"]

    # a saved directory: its layers are listed, the class token's block chosen
    props = _form(dataset, model_source="huggingface", hf_model=str(tmp_path))
    assert _errors(props) == {}
    assert props["target_layer"]["default"] == "vit.layers.1.layernorm_before"
    assert props["model_classes"]["view"]["label"] == f"Classes from the model: {len(CIFAR)}"
    assert props["model_classes"]["view"]["description"].startswith("airplane, automobile")

    params = dict(model_source="huggingface", hf_model=str(tmp_path), heatmap_field="vit_cam", pred_field="vit_pred")
    result = foo.execute_operator(COMPUTE_CAMS, ctx=dict(dataset=dataset, params=params))
    assert result.error is None, result.error
    dataset.reload()
    assert dataset.count("vit_cam") == len(dataset)
    # the model's id2label names, not output indices
    assert set(dataset.distinct("vit_pred.label")) <= set(CIFAR)
    assert cam_plugin.get_run(dataset, "vit_cam")["model_spec"] == f"hf:{tmp_path}"


def test_torchvision_names_show_their_weights_classes_and_files_none(dataset, tmp_path):
    props = _form(dataset, model_source="torchvision", torchvision_model="resnet18")
    assert props["model_classes"]["view"]["label"] == "Classes from the model: 1000"
    assert cam_plugin.model_classes("resnet18:none") is None
    assert cam_plugin.model_classes("resnet18") == cam_plugin.imagenet_classes()
    path = tmp_path / "net.pt"
    torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                                         torch.nn.Flatten())).save(str(path))
    # a file brings no names: the form asks for them instead
    props = _form(dataset, model_source="file", model_path=str(path))
    assert "model_classes" not in props and "class_names_source" in props


def test_values_of_hidden_inputs_do_not_reach_the_run():
    # the App keeps what was typed into inputs it no longer shows
    import forms

    params = dict(model_source="zoo", classes="a,b", class_names_source="typed", target_layer="layer4")
    kwargs = forms.compute_cams_kwargs(params)
    # the zoo's default model, as the form shows it; its own classes
    assert kwargs["model"] == "zoo:resnet50-imagenet-torch" and kwargs["classes"] is None
    # a layer the zoo model has is kept, another model's is not
    assert kwargs["target_layer"] == "layer4"
    assert forms.compute_cams_kwargs(dict(params, target_layer="features.28"))["target_layer"] is None
    # files and complete specifications keep their class names
    assert forms.compute_cams_kwargs(dict(params, model_source="file", model_path="/m.pt2"))["classes"] == ["a", "b"]
    assert forms.compute_cams_kwargs(dict(model="resnet18", classes=["x"]))["classes"] == ["x"]


def test_a_hugging_face_directory_must_hold_a_saved_model(dataset, tmp_path):
    pytest.importorskip("transformers", reason="transformers is a test dependency")
    props = _form(dataset, model_source="huggingface", hf_model=str(tmp_path))
    assert "No saved model in" in _errors(props)["hf_model"]
    props = _form(dataset, model_source="huggingface", hf_model="./not-here")
    assert "No saved model in" in _errors(props)["hf_model"]


def test_the_form_checks_every_field_the_run_writes(dataset):
    # a run judging by objects also writes <heatmap>_gt_class and
    # <heatmap>_correct: a user's field of that name is refused in the form,
    # not when the run starts
    import fiftyone as fo

    dataset.set_values("objects", [fo.Detections(detections=[])] * len(dataset))
    dataset.set_values("cam_correct", ["mine"] * len(dataset))
    params = dict(model_source="torchvision", torchvision_model="resnet18", weights="IMAGENET1K_V1",
                  label_field="objects", targets="pred")
    error = _errors(_form(dataset, **params))["heatmap_field"]
    assert "cam_correct" in error
    # with a classification field the run writes no such field
    assert "heatmap_field" not in _errors(_form(dataset, **dict(params, label_field="ground_truth")))
    dataset.set_values("cam_error", [1] * len(dataset))
    assert "cam_error" in _errors(_form(dataset, **dict(params, label_field="ground_truth")))["heatmap_field"]
