"""The App forms of the plugin's operators: inputs, choices and validation
shown to the user before anything runs, and the tables of their outputs.

Each ``*_inputs(ctx, inputs)`` function adds its properties to a
``types.Object`` and returns whether the form is complete and valid.

Part of the plugin, not of the library: like the operators, it uses only
the public API of :mod:`cam_plugin`.
"""

import os

import fiftyone as fo
import fiftyone.operators.types as types

import cam_plugin

MODEL_SOURCES = {
    "torchvision": "A torchvision classifier (weights download on first use)",
    "zoo": "A FiftyOne zoo classifier (downloads on first use, as the zoo does)",
    "huggingface": "A Hugging Face image classifier: a Hub id or a saved directory "
    "(downloads on first use)",
    "timm": "A timm model (pretrained weights download on first use)",
    "file": "An exported program (.pt2), a TorchScript file, or a checkpoint of a known architecture",
}
DEFAULT_TORCHVISION_MODEL = "resnet50"
DEFAULT_ZOO_MODEL = "resnet50-imagenet-torch"
# the spec prefix and the form parameter of each named-model source
NAMED_SOURCES = {"zoo": ("zoo:", "zoo_model"), "huggingface": ("hf:", "hf_model"), "timm": ("timm:", "timm_model")}
# the most names a model-name autocomplete sends with each form update
MAX_NAME_CHOICES = 50
CHECKPOINT_ARCHITECTURES = ["cifar10_resnet20"]


def model_spec(params):
    """The model specification string the library understands, from form
    parameters (None while incomplete)."""
    if params.get("model"):
        return str(params["model"])

    source = params.get("model_source", "torchvision")
    if source in NAMED_SOURCES:
        prefix, param = NAMED_SOURCES[source]
        # the zoo's dropdown has a default, as the form shows it
        name = (params.get(param) or (DEFAULT_ZOO_MODEL if source == "zoo" else "")).strip()
        if source == "huggingface" and name.startswith("~"):
            name = os.path.expanduser(name)
        return f"{prefix}{name}" if name else None
    if source == "file":
        path = (params.get("model_path") or "").strip()
        if not path:
            return None
        arch = params.get("architecture")
        return f"{arch}:{path}" if arch else path

    name = params.get("torchvision_model") or DEFAULT_TORCHVISION_MODEL
    weights = params.get("weights")
    return f"{name}:{weights}" if weights else name


def layer_choices(spec):
    """Usable layers of a model, last first, and the default, or an error
    message.

    The form is resolved while the user types, before anything is run, so
    no checkpoint is ever loaded here (unpickling one can run code from the
    file): the layers come from the architecture with random weights, which
    alone decides them, and from TorchScript files, which run no Python. A
    pickled model without an architecture gets a message instead. Nothing
    is downloaded either (:func:`cam_plugin.model_layers`)."""
    try:
        names, default = cam_plugin.model_layers(spec)
    except cam_plugin.ModelNotLocalError as e:
        # not refused: the run loads it (downloading it) and uses its
        # automatic layer
        return [], None, e
    except Exception as e:
        return [], None, str(e)

    return names, default, None


def model_inputs(ctx, inputs):
    """Model source, name/weights or path. Returns the model spec or None.

    A model file is only looked at, never loaded: one that is neither
    TorchScript nor given with its architecture is refused here, since only
    unpickling could tell what it holds."""
    if ctx.params.get("model"):
        # a complete specification given from Python
        inputs.str("model", required=True, label="Model")
        return model_spec(ctx.params)

    sources = types.RadioGroup(orientation="horizontal")
    for value, description in MODEL_SOURCES.items():
        sources.add_choice(value, label=value, description=description)
    inputs.enum(
        "model_source",
        sources.values(),
        default="torchvision",
        label="Model",
        view=sources,
    )

    source = ctx.params.get("model_source", "torchvision")
    if source in NAMED_SOURCES:
        return named_model_inputs(ctx, inputs, source)
    if source == "file":
        prop = inputs.str(
            "model_path",
            required=True,
            label="Model file",
            description="Path to an exported program (torch.export.save, .pt2), a TorchScript "
            "file (.pt) or a state-dict checkpoint",
        )
        path = (ctx.params.get("model_path") or "").strip()
        if path and not os.path.isfile(path):
            prop.invalid = True
            prop.error_message = f"No file at {path}"
            return None

        archs = _dropdown(CHECKPOINT_ARCHITECTURES + cam_plugin.torchvision_classifiers())
        inputs.str(
            "architecture",
            label="Architecture (for a checkpoint)",
            description="Leave empty for an exported program or a TorchScript file",
            view=archs,
        )
        if not class_names_inputs(ctx, inputs):
            return None
        self_describing = path and (
            cam_plugin.is_torchscript_file(path) or cam_plugin.is_exported_program_file(path)
        )
        if path and not ctx.params.get("architecture") and not self_describing:
            prop.invalid = True
            prop.error_message = (
                f"{path} is neither an exported program (.pt2) nor a TorchScript file. "
                "Choose the architecture of its state dict; a pickled model "
                "(torch.save(model)) is not opened from the App, because loading it "
                "would run code from the file: export it with torch.export.save, or "
                "load it from Python with trust_checkpoint=True if you trust it"
            )
            return None
    else:
        names = types.AutocompleteView()
        for name in cam_plugin.torchvision_classifiers():
            names.add_choice(name, label=name)
        prop = inputs.str(
            "torchvision_model",
            default=DEFAULT_TORCHVISION_MODEL,
            label="Torchvision classifier",
            view=names,
        )
        name = ctx.params.get("torchvision_model") or DEFAULT_TORCHVISION_MODEL
        weights = cam_plugin.torchvision_weights(name)
        if not weights:
            prop.invalid = True
            prop.error_message = f"'{name}' is not a torchvision classifier"
            return None

        choices = _dropdown(weights)
        inputs.enum(
            "weights",
            choices.values(),
            default=weights[0],
            label="Weights",
            description="The weights enum value (the first is DEFAULT)",
            view=choices,
        )

    return model_spec(ctx.params)


def named_model_inputs(ctx, inputs, source):
    """The name of a zoo, Hugging Face or timm model; its preprocessing and
    class names come from the model itself. Returns the spec or None."""
    _, param = NAMED_SOURCES[source]
    name = (ctx.params.get(param) or "").strip()
    if source == "zoo":
        names = cam_plugin.zoo_classifiers()
        choices = _dropdown(names)
        prop = inputs.enum(
            param, names, default=DEFAULT_ZOO_MODEL, label="Zoo classifier",
            description="The zoo's torchvision classifiers; its Transformers models "
            "are Hugging Face ids",
            view=choices,
        )
        name = name or DEFAULT_ZOO_MODEL
        if name not in names:
            prop.invalid = True
            prop.error_message = f"'{name}' is not one of the zoo's torchvision classifiers"
            return None
        return f"zoo:{name}"

    if source == "huggingface":
        prop = inputs.str(
            param, required=True, label="Hugging Face model",
            description="A Hub id (google/vit-base-patch16-224) or the directory of a "
            "save_pretrained model; its image processor and id2label are used",
        )
        if name and ("://" in name or name.startswith("hf:")):
            prop.invalid = True
            prop.error_message = "Type the id alone (owner/name), without 'hf:' or a URL"
            return None
        path = os.path.expanduser(name)
        if name and (name.startswith(("/", "~", ".")) or os.path.isdir(path)):
            # a directory, not a Hub id: it must hold a saved model
            if not os.path.isfile(os.path.join(path, "config.json")):
                prop.invalid = True
                prop.error_message = (
                    f"No saved model in {path}: a directory needs the config.json that "
                    "save_pretrained writes"
                )
                return None
        return model_spec(ctx.params)

    names = cam_plugin.timm_model_names()
    if not names:
        inputs.view(
            "timm_missing",
            types.Error(label="timm is not installed", description="pip install timm, then reload the App"),
        )
        return None
    typed = [n for n in names if name.lower() in n.lower()] if name else names
    choices = types.AutocompleteView()
    for timm_name in typed[:MAX_NAME_CHOICES]:
        choices.add_choice(timm_name, label=timm_name)
    prop = inputs.str(
        param, required=True, label="timm model",
        description="A name with its pretrained tag (resnet50.a1_in1k); its data config gives "
        "the preprocessing",
        view=choices,
    )
    return f"timm:{name}" if name else None


CLASS_NAME_SOURCES = {
    "typed": "Typed here, comma-separated",
    "file": "A text file, one name per line",
    "imagenet": "The 1,000 ImageNet-1k classes",
}


def class_names_inputs(ctx, inputs):
    """Where a model file's class names come from: typed, a text file (read
    here to check it), or the ImageNet-1k names. They name the predictions
    and match the ground-truth labels; without them labels are output
    indices. Returns False when the chosen file cannot be used."""
    sources = types.RadioGroup(orientation="horizontal")
    for value, label in CLASS_NAME_SOURCES.items():
        sources.add_choice(value, label=label)
    inputs.enum(
        "class_names_source", sources.values(), default="typed", label="Class names", view=sources
    )
    source = ctx.params.get("class_names_source") or "typed"
    if source == "typed":
        inputs.str(
            "classes",
            label="Class names",
            description="Comma-separated, in the order of the model's outputs; "
            "needed to name predictions and to match ground-truth labels",
        )
    elif source == "file":
        prop = inputs.str(
            "classes_file",
            required=True,
            label="Class names file",
            description="A text file with one class name per line, in the order of the model's outputs",
        )
        path = (ctx.params.get("classes_file") or "").strip()
        if path:
            try:
                names = cam_plugin.read_class_names(path)
            except ValueError as e:
                prop.invalid = True
                prop.error_message = str(e)
                return False
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            inputs.view("classes_read", types.Notice(label=f"{len(names)} class names: {shown}"))
    else:
        inputs.view(
            "imagenet_notice",
            types.Notice(label="Predictions are named with torchvision's ImageNet-1k categories; "
                         "the model must have 1,000 outputs"),
        )
    return True


def classes_from(params):
    """The ``classes`` argument of :func:`cam_plugin.compute_cams` from form
    parameters: a list, ``"imagenet"``, a file path, or None."""
    source = params.get("class_names_source") or "typed"
    if source == "file" and params.get("classes_file"):
        return params["classes_file"].strip()
    if source == "imagenet":
        return "imagenet"
    classes = params.get("classes") or []
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    return list(classes) or None


def method_inputs(inputs):
    choices = types.DropdownView()
    for name, spec in cam_plugin.METHODS.items():
        choices.add_choice(name, label=name, description=spec.description)
    inputs.enum(
        "method",
        choices.values(),
        default="gradcam",
        label="Method",
        view=choices,
    )


def layer_inputs(ctx, inputs, spec):
    names, default, error = layer_choices(spec)
    if isinstance(error, cam_plugin.ModelNotLocalError):
        inputs.view(
            "layer_notice",
            types.Notice(
                label="The automatic layer will be used",
                description=f"{error} The run downloads the model and takes its automatic layer.",
            ),
        )
        return True
    if error is not None:
        inputs.view(
            "layer_error",
            types.Error(label="This model cannot produce CAMs", description=error),
        )
        return False

    choices = types.DropdownView()
    for name in names:
        label = f"{name} (automatic)" if name == default else name
        choices.add_choice(name, label=label)

    prop = inputs.str(
        "target_layer",
        default=default,
        label="Target layer",
        description="The layer the maps are taken from; the automatic choice "
        "is the last spatial layer the class scores depend on",
        view=choices,
    )
    layer = ctx.params.get("target_layer") or default
    if layer not in names:
        prop.invalid = True
        prop.error_message = f"Unknown layer '{layer}'; choose one from the list"
        return False

    return True


def model_classes_notice(inputs, spec):
    """Says which class names the chosen model brings (nothing is
    downloaded: :func:`cam_plugin.model_classes`), so the user sees what
    predictions will be called before running."""
    try:
        classes = cam_plugin.model_classes(spec)
    except Exception:  # noqa: BLE001 (the layer input already says what is wrong)
        return
    if not classes:
        return
    shown = ", ".join(classes[:8]) + (", ..." if len(classes) > 8 else "")
    inputs.view(
        "model_classes",
        types.Notice(label=f"Classes from the model: {len(classes)}", description=shown),
    )


def classification_fields(samples):
    schema = samples.get_field_schema(embedded_doc_type=fo.Classification)
    return sorted(schema)


def ground_truth_fields(samples):
    """The fields compute_cams takes as ground truth: classifications, and
    objects (detections, polylines) whose largest one gives the class."""
    return _fields_of(samples, (fo.Classification, fo.Detections, fo.Polylines))


def target_inputs(ctx, inputs, samples):
    inputs.bool(
        "multilabel",
        default=False,
        label="Multi-label model",
        description="Independent sigmoid scores (several classes per image): one heatmap field "
        "per class, for the samples predicted or labelled with it",
    )
    if ctx.params.get("multilabel"):
        return multilabel_inputs(ctx, inputs, samples)
    choices = types.RadioGroup(orientation="horizontal")
    choices.add_choice("pred", label="Predicted class")
    choices.add_choice("gt", label="Ground-truth class")
    choices.add_choice("both", label="Both")
    inputs.enum(
        "targets",
        choices.values(),
        default="pred",
        label="Maps for",
        view=choices,
    )

    label_fields = ground_truth_fields(samples)
    fields = _dropdown(label_fields)
    prop = inputs.str(
        "label_field",
        label="Ground-truth field",
        description="fo.Classification labels, or fo.Detections / fo.Polylines (an image's "
        "class is then its largest object's); needed for ground-truth maps",
        view=fields,
    )

    target = ctx.params.get("targets", "pred")
    label_field = ctx.params.get("label_field")
    if target in ("gt", "both") and not label_field:
        prop.invalid = True
        prop.error_message = (
            "Ground-truth maps need a ground-truth field"
            + ("" if label_fields else "; this dataset has no classification, detections or polylines field")
        )
        return False

    return class_map_input(ctx, inputs) if label_field else True


def multilabel_inputs(ctx, inputs, samples):
    """The threshold and ground truth of a multi-label run."""
    prop = inputs.float(
        "threshold", default=0.5, min=0, max=1, label="Threshold",
        description="A class is predicted when its probability reaches this",
    )
    threshold = ctx.params.get("threshold", 0.5)
    if threshold is None or not 0 < float(threshold) < 1:
        prop.invalid = True
        prop.error_message = "The threshold is a probability between 0 and 1"
        return False
    fields = _dropdown(_fields_of(samples, (fo.Classifications, fo.Classification, fo.Detections, fo.Polylines)))
    inputs.str(
        "label_field",
        label="Ground-truth field (optional)",
        description="fo.Classifications, or objects (fo.Detections / fo.Polylines: every "
        "object's class is a label of the image)",
        view=fields,
    )
    return True


def class_map_input(ctx, inputs):
    """The class map file (JSON or CSV) from the ground truth's classes to
    the model's, read and checked as the user types (its model classes are
    checked against the model's when the run starts)."""
    prop = inputs.str(
        "class_map_file",
        label="Class map (optional)",
        description="A .json file {dataset class: [model classes]} or a .csv file (rows: "
        "dataset class, model class, ...) when the labels are not the model's class names; "
        "a prediction is right when it is one of its class's model classes",
    )
    path = (ctx.params.get("class_map_file") or "").strip()
    if not path:
        return True
    try:
        class_map = cam_plugin.ClassMap.load(path)
    except cam_plugin.ClassMapError as e:
        prop.invalid = True
        prop.error_message = str(e)
        return False
    inputs.view(
        "class_map_read",
        types.Notice(label=f"{len(class_map)} dataset classes mapped: {', '.join(sorted(class_map.sets)[:8])}"
                     f"{', ...' if len(class_map) > 8 else ''}"),
    )
    return True


def new_field_input(
    ctx, inputs, name, label, default, run_key, ftype, doc_type, description=None, derived=()
):
    """A text input for an output field name, validated against the dataset:
    bad names, fields of another type and fields of other runs are refused.
    ``derived`` names further fields written alongside it: suffixes of the
    same type, or a dict from suffix to ``(ftype, doc_type)``."""
    prop = inputs.str(name, default=default, label=label, description=description)
    value = ctx.params.get(name, default)
    fields = {value: (ftype, doc_type)}
    if not isinstance(derived, dict):
        derived = {suffix: (ftype, doc_type) for suffix in derived}
    fields.update({f"{value}{suffix}": types_ for suffix, types_ in derived.items()})
    try:
        cam_plugin.check_fields(ctx.dataset, run_key, fields)
    except cam_plugin.RunError as e:
        prop.invalid = True
        prop.error_message = str(e)
        return None

    return value


def _derived_fields(ctx):
    """The fields a compute_cams run writes beside its heatmap field, by
    suffix, so that the form refuses a name the run would refuse."""
    derived = {"_error": (fo.StringField, None)}
    if ctx.params.get("multilabel"):
        # (the per-class fields are checked by the run, once the model's
        # classes are known)
        if ctx.params.get("label_field"):
            derived["_gt_labels"] = (fo.EmbeddedDocumentField, fo.Classifications)
        return derived
    if ctx.params.get("targets", "pred") in ("gt", "both"):
        derived["_gt"] = (fo.EmbeddedDocumentField, fo.Heatmap)
    label_field = ctx.params.get("label_field")
    field = ctx.dataset.get_field(label_field) if label_field else None
    objects = getattr(field, "document_type", None) in (fo.Detections, fo.Polylines)
    if label_field and (objects or (ctx.params.get("class_map_file") or "").strip()):
        # judged by a class map (or an image class from objects)
        derived["_gt_class"] = (fo.EmbeddedDocumentField, fo.Classification)
        derived["_correct"] = (fo.BooleanField, None)
    return derived


def compute_cams_inputs(ctx, inputs):
    """The compute_cams form. Returns True when complete and valid."""
    samples = ctx.target_view()

    spec = model_inputs(ctx, inputs)
    if spec is None:
        return False

    method_inputs(inputs)
    if not layer_inputs(ctx, inputs, spec):
        return False
    model_classes_notice(inputs, spec)

    if not target_inputs(ctx, inputs, samples):
        return False

    run_key = ctx.params.get("heatmap_field") or "cam"
    pred = new_field_input(
        ctx, inputs, "pred_field", "Prediction field", "cam_prediction", run_key,
        fo.EmbeddedDocumentField,
        fo.Classifications if ctx.params.get("multilabel") else fo.Classification,
    )
    heat = new_field_input(
        ctx, inputs, "heatmap_field", "Heatmap field", "cam", run_key,
        fo.EmbeddedDocumentField, fo.Heatmap,
        description="Also the run key; ground-truth maps go to <field>_gt",
        derived=_derived_fields(ctx),
    )
    ok = pred is not None and heat is not None

    scales = types.RadioGroup(orientation="horizontal")
    scales.add_choice(
        "map", label="Per map",
        description="Each map scaled to its own maximum: compares places within an image",
    )
    scales.add_choice(
        "dataset", label="Dataset-wide",
        description="One scale for all samples: the same value, the same colour on every image",
    )
    inputs.enum("heatmap_scale", scales.values(), default="map", label="Heatmap scale", view=scales)

    inputs.bool(
        "store_logits",
        default=False,
        label="Store logits",
        description="Keep every class's logit on the predictions (as apply_model's "
        "store_logits): 1,000 numbers per sample for an ImageNet model",
    )
    inputs.int("batch_size", default=16, min=1, label="Batch size")
    devices = _dropdown(_devices())
    inputs.enum("device", devices.values(), default=_devices()[0], label="Device", view=devices)
    run_options_inputs(inputs, "Delete the run with this key (its fields and files) and compute it again")
    return ok


def run_options_inputs(inputs, overwrite_description):
    """Overwrite, retry and shard choices shared by the run forms."""
    inputs.bool("overwrite", default=False, label="Overwrite", description=overwrite_description)
    inputs.bool(
        "retry_failed",
        default=False,
        label="Retry failed samples",
        description="Compute again the samples an earlier call of this run failed on",
    )
    inputs.int(
        "num_shards",
        default=1,
        min=1,
        label="Shards",
        description="More than 1 queues that many delegated operations over disjoint "
        "parts of the samples, for as many `fiftyone delegated launch` workers",
    )


def _devices():
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] + devices
    return devices


def compute_cams_kwargs(params):
    """The :func:`cam_plugin.compute_cams` keyword arguments of a completed
    form, or of the parameters a Python caller or a queued shard gave."""
    targets = {"pred": ["pred"], "gt": ["gt"], "both": ["pred", "gt"]}
    # queued shards carry the run's targets in the library's terms
    target = params.get("target_list") or params.get("targets") or "pred"
    source = params.get("model_source", "torchvision")
    # the App keeps the values of inputs it no longer shows: class names
    # typed for a file, or a layer chosen for another model, must not reach
    # a model that brings its own (or whose layers the form did not list)
    classes = classes_from(params) if params.get("model") or source == "file" else None
    target_layer = params.get("target_layer")
    if target_layer and not params.get("model") and source in NAMED_SOURCES:
        names, _, _ = layer_choices(model_spec(params))
        target_layer = target_layer if target_layer in names else None
    multilabel = bool(params.get("multilabel", False))
    kwargs = dict(
        classes=classes,
        model=model_spec(params),
        method=params.get("method", "gradcam"),
        target_layer=target_layer,
        label_field=params.get("label_field") or None,
        # a queued shard carries the map as the run records it
        class_map=params.get("class_map") or (params.get("class_map_file") or "").strip() or None,
        targets=targets.get(target, target) if isinstance(target, str) else list(target),
        pred_field=params.get("pred_field", "cam_prediction"),
        heatmap_field=params.get("heatmap_field", "cam"),
        heatmap_scale=params.get("heatmap_scale") or None,
        batch_size=params.get("batch_size"),
        device=params.get("device"),
        overwrite=bool(params.get("overwrite", False)),
        retry_failed=bool(params.get("retry_failed", False)),
        store_logits=bool(params.get("store_logits", False)),
        num_shards=int(params.get("num_shards") or 1),
        multilabel=multilabel,
        threshold=float(params.get("threshold") or 0.5),
        shard=params.get("shard"),
    )
    if multilabel:
        # a map per class; the targets and class map inputs are hidden
        # (the App keeps their values), a queued shard names its classes
        kwargs["targets"] = list(params["target_list"]) if params.get("target_list") else None
        kwargs["class_map"] = None
    # what only Python callers and queued shards pass
    for name in ("num_workers", "mixed_precision", "chunk_size", "heatmap_size", "output_dir", "run_key"):
        if params.get(name) is not None:
            kwargs[name] = params[name]
    return kwargs


def _dropdown(values):
    """A dropdown offering each value under its own name."""
    view = types.DropdownView()
    for value in values:
        view.add_choice(value, label=value)
    return view


def _fields_of(samples, doc_types):
    schema = samples.get_field_schema()
    names = []
    for name, field in schema.items():
        if isinstance(field, fo.EmbeddedDocumentField) and issubclass(
            field.document_type, doc_types
        ):
            names.append(name)
    return sorted(names)


def heatmap_field_input(ctx, inputs, samples, with_metrics=False, for_summary=False):
    """A dropdown of the heatmap fields. With ``with_metrics``, only those
    the views can use (attention metrics on objects, predictions known),
    or with ``for_summary`` those the per-class summary can use (ground
    truth known too); the others are listed with what they lack. Returns
    the chosen field, or None when there is nothing valid to choose."""
    if not with_metrics:
        names = _fields_of(samples, fo.Heatmap)
        problems = {}
        no_choice = "This dataset has no heatmap field: run 'Compute class activation maps' first"
    else:
        described = cam_plugin.attention_fields(samples)
        names, problems = _usable(described, for_summary)
        no_choice = (
            "No heatmap field can be used yet: "
            + "; ".join(problems.values())
            if problems
            else "No heatmap field has attention metrics yet: run 'Compute class "
            "activation maps' with a ground-truth field, then 'Compute attention "
            "metrics' with the objects' boxes, polygons or masks"
        )

    if not names:
        prop = inputs.view("no_heatmaps", types.Warning(label="Nothing to run on", description=no_choice))
        prop.invalid = True
        return None

    choices = _dropdown(names)
    default = "cam" if "cam" in names else names[0]
    prop = inputs.enum(
        "heatmap_field", choices.values(), default=default, label="Heatmap field", view=choices
    )
    value = ctx.params.get("heatmap_field") or default
    if value not in names:
        prop.invalid = True
        prop.error_message = problems.get(value) or f"'{value}' is not a heatmap field of these samples"
        return None

    if problems:
        inputs.view(
            "unusable",
            types.Notice(
                label="Not offered: " + ", ".join(problems),
                description="; ".join(problems.values()),
            ),
        )
    return value


def compute_attention_inputs(ctx, inputs):
    """The compute_attention form. Returns True when complete and valid."""
    samples = ctx.target_view()
    heatmap_field = heatmap_field_input(ctx, inputs, samples)
    if heatmap_field is None:
        return False

    regions = _dropdown(_fields_of(samples, cam_plugin.REGION_TYPES))
    inputs.str(
        "region_field",
        label="Object regions",
        description="Boxes, polygons, a segmentation or a heatmap marking the objects; "
        "without one only the border energy and pred/gt agreement are computed",
        view=regions,
    )

    classes = types.RadioGroup(orientation="horizontal")
    classes.add_choice("gt", label="Ground-truth class", description="Objects of the sample's class")
    classes.add_choice("all", label="All objects")
    inputs.enum("region_classes", classes.values(), default="gt", label="Which objects", view=classes)
    inputs.float("tolerance", default=15.0, min=0, label="Pointing tolerance (pixels)")
    inputs.float("border", default=0.1, min=0, max=0.5, label="Border band (fraction of each side)")
    run_options_inputs(inputs, "Delete the earlier attention run of this field and measure again")

    region_field = ctx.params.get("region_field")
    overwrite = ctx.params.get("overwrite", False)
    key = f"{heatmap_field}_attention"
    if key in cam_plugin.list_runs(samples) and not overwrite:
        existing = cam_plugin.get_run(samples, key)
        if existing.get("region_field") != region_field:
            prop = inputs.view(
                "exists",
                types.Warning(
                    label=f"Attention run '{key}' exists with regions "
                    f"'{existing.get('region_field')}': tick Overwrite to replace it"
                ),
            )
            prop.invalid = True
            return False
        inputs.view(
            "continues",
            types.Notice(label=f"Continues run '{key}': only samples not yet measured are computed"),
        )

    return region_field is None or region_field in _fields_of(samples, cam_plugin.REGION_TYPES)


def compute_attention_kwargs(params):
    kwargs = dict(
        heatmap_field=params.get("heatmap_field", "cam"),
        region_field=params.get("region_field") or None,
        region_classes=params.get("region_classes", "gt"),
        tolerance=float(params.get("tolerance", 15.0)),
        border=float(params.get("border", 0.1)),
        overwrite=bool(params.get("overwrite", False)),
        retry_failed=bool(params.get("retry_failed", False)),
        num_shards=int(params.get("num_shards") or 1),
        shard=params.get("shard"),
    )
    # what only Python callers and queued shards pass
    for name in (
        "label_field", "gt_heatmap_field", "mask_values", "heatmap_threshold",
        "top_fraction", "run_key", "batch_size", "device",
    ):
        if params.get(name) is not None:
            kwargs[name] = params[name]
    return kwargs


def _usable(described, for_summary):
    """The usable fields' names, and the others' problems by field."""
    if for_summary:
        return (
            [f.heatmap_field for f in described if f.summarisable],
            {f.heatmap_field: f.problem or f.summary_problem for f in described if not f.summarisable},
        )
    return (
        [f.heatmap_field for f in described if f.usable],
        {f.heatmap_field: f.problem for f in described if not f.usable},
    )


def view_names(samples, heatmap_field):
    """The views :func:`cam_plugin.attention_views` builds for a field:
    only those that need no ground truth for a field without it."""
    return cam_plugin.views.view_names(samples, heatmap_field)


def threshold_inputs(inputs, with_views=True, views=None):
    t = cam_plugin.Thresholds()
    inputs.float(
        "background_focus",
        default=t.background_focus,
        label="Background below focus",
        description="focus = (energy - area) / (1 - area): 0 is uniform attention, 1 all on the object",
    )
    inputs.float("object_focus", default=t.object_focus, label="On the object from focus")
    inputs.float(
        "max_object_area",
        default=t.max_object_area,
        min=0,
        max=1,
        label="Largest object area",
        description="Samples whose object covers more of the image are left out",
    )
    if with_views:
        inputs.float("confidence", default=t.confidence, min=0, max=1, label="Confident from")
        inputs.float(
            "border_energy", default=t.border_energy, min=0, max=1, label="On the border from",
            description="The share of the map's mass on the border band (10% of each side); "
            "a uniform map puts 0.36 there",
        )
        views = list(views or cam_plugin.VIEW_DESCRIPTIONS)
        if not set(cam_plugin.VIEW_DESCRIPTIONS) <= set(views):
            inputs.view(
                "ground_truth_free",
                types.Notice(
                    label=f"Without ground truth: only {', '.join(views)}",
                    description="The other views compare the predictions with ground truth",
                ),
            )
        choices = types.DropdownView()
        for name in views:
            choices.add_choice(name, label=name, description=cam_plugin.views.view_description(name))
        inputs.enum(
            "open_view",
            choices.values(),
            default=views[0],
            label="View to open",
            view=choices,
        )


def thresholds_from(params):
    """The thresholds of a completed form as the keyword arguments of
    :func:`cam_plugin.attention_views` (``background_focus``,
    ``object_focus``, ``max_object_area``, ``confidence``)."""
    t = cam_plugin.Thresholds()
    return dict(
        background_focus=float(params.get("background_focus", t.background_focus)),
        object_focus=float(params.get("object_focus", t.object_focus)),
        max_object_area=float(params.get("max_object_area", t.max_object_area)),
        confidence=float(params.get("confidence", t.confidence)),
        border_energy=float(params.get("border_energy", t.border_energy)),
    )


def summary_thresholds_from(params):
    """The thresholds of a completed form that
    :func:`cam_plugin.class_summary` takes."""
    t = thresholds_from(params)
    return dict(background_focus=t["background_focus"], max_object_area=t["max_object_area"])


SUMMARY_COLUMNS = [
    ("class", "Class"),
    ("samples", "Samples"),
    ("off_object", "Off the object"),
    ("off_object_share", "Share off"),
    ("interval", "95% interval"),
    ("support", "Support"),
    ("mean_focus", "Mean focus"),
    ("accuracy", "Accuracy"),
    ("misclassified_background", "Wrong, off the object"),
]


def summary_rows_for_display(rows):
    """The per-class summary rows for a table: fractions rounded, the
    interval as text, and classes with too few samples marked."""
    display = []
    for row in rows:
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
        shown["interval"] = f"{row['off_object_low']:.0%} to {row['off_object_high']:.0%}"
        shown["support"] = "enough" if row["enough_samples"] else "few samples: ranked last"
        display.append(shown)
    return display


#: the layout of the per-class summary's bar chart (operator output and panel)
SUMMARY_PLOT_LAYOUT = {
    "yaxis": {
        "title": {"text": "share looking off the object"},
        "tickformat": ".0%",
        "range": [0, 1.12],
    },
    "xaxis": {"title": {"text": "ground-truth class"}, "type": "category"},
    "height": 340,
    "margin": {"t": 20, "l": 70, "b": 60, "r": 20},
    "showlegend": False,
}

#: bars of classes with enough samples, and of those ranked last for having
#: too few (Thresholds.min_samples)
BAR_COLOR = "#ff6d04"
FEW_SAMPLES_COLOR = "#b0b0b0"


def summary_traces(rows):
    """The Plotly traces of the per-class summary (the value the App's plot
    views read): one bar per class with its count ("3/12") written on it,
    so a class at 0% still shows, and its 95% interval as an error bar."""
    return [
        {
            "type": "bar",
            "x": [r["class"] for r in rows],
            "y": [r["off_object_share"] for r in rows],
            "ids": [r["class"] for r in rows],
            "text": [f"{r['off_object']}/{r['samples']}" for r in rows],
            "textposition": "outside",
            "cliponaxis": False,
            "marker": {
                "color": [BAR_COLOR if r["enough_samples"] else FEW_SAMPLES_COLOR for r in rows],
                # an outline keeps a 0% bar visible as a line on the axis
                "line": {"color": "#c24f00", "width": 1},
            },
            "error_y": {
                "type": "data",
                "symmetric": False,
                "array": [r["off_object_high"] - r["off_object_share"] for r in rows],
                "arrayminus": [r["off_object_share"] - r["off_object_low"] for r in rows],
                "color": "#666666",
                "thickness": 1,
                "width": 3,
            },
            "customdata": [
                [r["samples"], r["off_object"], r["off_object_low"], r["off_object_high"]] for r in rows
            ],
            "hovertemplate": "%{x}: %{customdata[1]} of %{customdata[0]} samples off the object "
            "(%{y:.0%}, 95% interval %{customdata[2]:.0%} to %{customdata[3]:.0%})<extra></extra>",
        }
    ]


def summary_note(rows, heatmap_field, ran_on, min_samples=None):
    """The sentence under the per-class chart: what it counts, on what, and
    how to read the colours of the heatmaps it is about."""
    min_samples = min_samples or cam_plugin.Thresholds().min_samples
    measured = sum(r["samples"] for r in rows)
    return (
        f"**{heatmap_field}** on {ran_on}: {measured} samples measured in {len(rows)} classes. "
        f"Each bar is the share of a class's samples whose attention is mostly off the "
        f"labelled object (focus below the threshold), with its count and 95% interval; "
        f"classes are ranked by the interval's lower end, and grey bars (fewer than "
        f"{min_samples} samples) are ranked last. Click a bar to see those samples."
        + _unmapped_note(rows)
    )


def _unmapped_note(rows):
    # a run judging by a class map: the samples it could judge in no class
    unmapped = getattr(rows, "unmapped", 0)
    if not unmapped:
        return ""
    labels = ", ".join(f"{k} {v}" for k, v in list(getattr(rows, "unmapped_labels", {}).items())[:5])
    return (
        f" {unmapped} sample{'s' if unmapped != 1 else ''} whose labels the class map does not "
        f"cover are in no class" + (f" (their labels: {labels})." if labels else ".")
    )


RUN_COLUMNS = [
    ("key", "Run key"),
    ("status", "Status"),
    ("samples", "Samples"),
    ("shards", "Shards"),
    ("timestamp", "Started"),
]

#: the second table of the run manager: what each run computed, and the
#: fields it owns (long texts: a table of their own fits the App's dialog)
RUN_FIELD_COLUMNS = [
    ("key", "Run key"),
    ("what", "What"),
    ("fields", "Fields"),
]

#: the third: where each run's heatmap files are (full paths are long)
RUN_FILES_COLUMNS = [
    ("key", "Run key"),
    ("files_dir", "Heatmap files"),
]


def _short_model(spec):
    # a checkpoint's directory makes the row wider than the App's dialog; the
    # full spec is in the run's record (get_run)
    if not spec:
        return spec
    head, sep, tail = str(spec).rpartition(":")
    if "/" in tail or os.sep in tail:
        return f"{head}{sep}{os.path.basename(tail)}"
    return os.path.basename(spec) if ("/" in spec or os.sep in spec) else spec


def counts_text(counts):
    """A run's counts in words: ``"46 done, 2 failed, 0 to do"``."""
    def n(name):
        value = counts.get(name)
        return "?" if value is None else value

    return f"{n('processed')} done, {n('failed')} failed, {n('todo')} to do"


# the order shard states are listed in; "waiting": no worker has taken the
# shard yet (a queued delegated operation)
SHARD_STATES = ("done", "running", "stale", "failed", "waiting")


def shards_text(config):
    """A sharded run's shards in a few words, e.g. ``"4: 2 done, 1 running,
    1 stale"``; ``"-"`` for a run that is not sharded."""
    num_shards = int(config.get("num_shards") or 1)
    if num_shards <= 1:
        return "-"

    shards = config.get("shards") or {}
    states = [(shards.get(str(s)) or {}).get("state") or "waiting" for s in range(num_shards)]
    counts = {state: states.count(state) for state in SHARD_STATES if state in states}
    # a state this module does not know yet still shows
    counts.update({state: states.count(state) for state in states if state not in counts})
    return f"{num_shards}: " + ", ".join(f"{n} {state}" for state, n in counts.items())


def run_rows(samples):
    """One row per run of this plugin, for the App's run manager: key,
    kind, status, counts (as numbers and as ``samples`` text), shards, what
    it computed, the fields and files it owns, and when it started."""
    cam_runs = set(cam_plugin.list_runs(samples, "cams"))
    rows = []
    for key in cam_plugin.list_runs(samples):
        config = cam_plugin.get_run(samples, key)
        counts = config.get("counts") or {}
        if key in cam_runs:
            kind = "cams"
            what = f"{config.get('cam_method')} at {config.get('layer')} of {_short_model(config.get('model'))}"
        else:
            kind = "attention"
            what = f"{config.get('heatmap_field')} vs {config.get('region_field') or 'no regions'}"
        rows.append(
            {
                "key": key,
                "kind": kind,
                "status": config.get("status"),
                "samples": counts_text(counts),
                "what": f"{kind}: {what}",
                "fields": ", ".join(config.get("fields") or []),
                "files_dir": config.get("files_dir") or "-",
                "processed": counts.get("processed"),
                "failed": counts.get("failed"),
                "todo": counts.get("todo"),
                "shards": shards_text(config),
                "timestamp": (config.get("timestamp") or "")[:19].replace("T", " "),
            }
        )
    return rows


def run_key_input(ctx, inputs):
    """A dropdown of this plugin's runs; returns the chosen key or None."""
    keys = cam_plugin.list_runs(ctx.dataset)
    if not keys:
        prop = inputs.view("no_runs", types.Warning(label="This dataset has no CAM runs"))
        prop.invalid = True
        return None

    choices = types.DropdownView()
    for row in run_rows(ctx.dataset):
        choices.add_choice(row["key"], label=row["key"], description=f"{row['kind']}: {row['what']}")
    inputs.enum("run_key", choices.values(), required=True, label="Run", view=choices)
    return ctx.params.get("run_key")


def delete_run_inputs(ctx, inputs):
    key = run_key_input(ctx, inputs)
    if key is None:
        return False

    config = cam_plugin.get_run(ctx.dataset, key)
    dependents = [
        k
        for k in cam_plugin.list_runs(ctx.dataset)
        if key in (cam_plugin.get_run(ctx.dataset, k).get("depends_on") or [])
    ]
    text = f"Deletes fields {', '.join(config.get('fields') or [])}"
    if config.get("files_dir"):
        text += f" and the heatmap files in {config['files_dir']}"
    if dependents:
        text += f", and the runs computed from it: {', '.join(dependents)}"
    inputs.view("warning", types.Warning(label=f"You are about to delete run '{key}'", description=text))
    return True


def usable_attention_fields(samples):
    """The heatmap fields the views, the summary and its panel can use, and
    the sentences saying why the others cannot."""
    names, problems = _usable(cam_plugin.attention_fields(samples), for_summary=True)
    return names, list(problems.values())


TARGET_TEXTS = {
    "DATASET": "the whole dataset",
    "DATASET_VIEW": "the whole dataset",
    "BASE_VIEW": "the base view",
    "CURRENT_VIEW": "the current view",
    "SELECTED_SAMPLES": "the selected samples",
    "SELECTED_LABELS": "the samples of the selected labels",
}


def target_text(ctx, samples=None):
    """What an operator ran on, in words with its size, e.g. ``"the
    current view (48 samples)"``: the standard target choice (dataset,
    current view, selected samples), or its default when the form did not
    show it."""
    target = ctx.params.get("view_target") or ctx.request_params.get("view_target")
    if target in TARGET_TEXTS:
        text = TARGET_TEXTS[target]
    else:
        text = "the current view" if ctx.has_custom_view else "the whole dataset"
    samples = ctx.target_view() if samples is None else samples
    n = samples.count()
    return f"{text} ({n} sample{'s' if n != 1 else ''})"


# ---------------------------------------------------------------------------
# What the model relies on: background intervention and context labels
# ---------------------------------------------------------------------------

FILL_CHOICES = [
    ("mean", "Mean colour", "The ImageNet mean colour (124, 116, 104)"),
    ("blur", "Blur", "A strong Gaussian blur of the image: colours stay, shapes go"),
    ("swap", "Another background", "The background of a sample of another class (ImageNet-9's Mixed-Rand)"),
]


def cam_prediction_fields(samples):
    """The predictions fields of the single-label CAM runs, each with its
    run's record (whose ``model_spec`` is None when the model was given in
    memory and cannot be loaded again)."""
    found = {}
    for key in cam_plugin.list_runs(samples, "cams"):
        config = cam_plugin.get_run(samples, key)
        if not config.get("multilabel") and config.get("pred_field"):
            found[config["pred_field"]] = config
    return found


def compute_reliance_inputs(ctx, inputs):
    """The compute_reliance form. Returns True when complete and valid."""
    samples = ctx.target_view()
    runs = cam_prediction_fields(samples)
    if not runs:
        prop = inputs.view(
            "no_predictions",
            types.Warning(
                label="Nothing to test",
                description="Run 'Compute class activation maps' first: the test uses its model "
                "and predictions",
            ),
        )
        prop.invalid = True
        return False
    choices = _dropdown(list(runs))
    default = "cam_prediction" if "cam_prediction" in runs else list(runs)[0]
    inputs.enum(
        "pred_field", choices.values(), default=default, label="Predictions",
        description="The CAM run whose model is tested (its class names and transforms too)",
        view=choices,
    )
    pred_field = ctx.params.get("pred_field") or default
    config = runs.get(pred_field, {})
    if not _reloadable_model(inputs, config, "compute_reliance"):
        return False
    inputs.view("model", types.Notice(label=f"Model: {config['model_spec']}"))

    regions = _fields_of(samples, cam_plugin.REGION_TYPES)
    region_default = _measured_region(samples, config.get("heatmap_field"), regions)
    prop = inputs.enum(
        # (required only without a default: the App flags a required input
        # whose value is its default as missing)
        "region_field", _dropdown(regions).values(), required=region_default is None, label="Object regions",
        description="The labelled objects painted over; everything else is the background",
        view=_dropdown(regions),
        # the regions its maps were measured against, when they were
        default=region_default,
    )
    if not regions:
        prop.invalid = True
        prop.error_message = "These samples have no boxes, polygons or masks to paint over"
        return False

    classes = types.RadioGroup(orientation="horizontal")
    classes.add_choice("gt", label="Ground-truth class", description="Objects of the sample's class")
    classes.add_choice("all", label="All objects")
    inputs.enum("region_classes", classes.values(), default="gt", label="Which objects", view=classes)
    fills = types.RadioGroup(orientation="horizontal")
    for value, label, description in FILL_CHOICES:
        fills.add_choice(value, label=label, description=description)
    inputs.enum("fill", fills.values(), default="mean", label="Painted with", view=fills)

    heatmap_field = config.get("heatmap_field") or "cam"
    fill = ctx.params.get("fill") or "mean"
    # one run per fill side by side: cam_bg_reliance, cam_swap_bg_reliance
    default_prefix = heatmap_field if fill == "mean" else f"{heatmap_field}_{fill}"
    prefix_prop = inputs.str(
        "prefix", default=default_prefix, label="Field prefix",
        description="Fields <prefix>_bg_reliance, <prefix>_bg_flip, ...; the run key is <prefix>_reliance",
    )
    prefix = ctx.params.get("prefix") or default_prefix
    try:
        cam_plugin.check_fields(ctx.dataset, f"{prefix}_reliance", cam_plugin.reliance_fields(prefix, fill))
    except cam_plugin.RunError as e:
        prefix_prop.invalid = True
        prefix_prop.error_message = str(e)
        return False
    run_options_inputs(inputs, "Delete the earlier reliance run with this prefix and test again")
    return (ctx.params.get("region_field") or region_default) in regions


def _reloadable_model(inputs, config, function):
    """Whether the CAM run ``config`` can be loaded again by a run's form;
    else says to call ``cam_plugin.<function>`` with the model from Python."""
    if config.get("model_spec"):
        return True
    prop = inputs.view(
        "model_in_memory",
        types.Warning(
            label="This run's model cannot be loaded again",
            description="It was given to compute_cams as an in-memory model: run "
            f"cam_plugin.{function}(..., model=your_model) from Python",
        ),
    )
    prop.invalid = True
    return False


def _measured_region(samples, heatmap_field, regions):
    """The region field an attention run measured ``heatmap_field``
    against, if it is among ``regions``; else None."""
    for key in cam_plugin.list_runs(samples, "attention"):
        config = cam_plugin.get_run(samples, key)
        if config.get("heatmap_field") == heatmap_field and config.get("region_field") in regions:
            return config["region_field"]
    return None


def compute_reliance_kwargs(params):
    kwargs = dict(
        pred_field=params.get("pred_field", "cam_prediction"),
        region_field=params.get("region_field") or None,
        region_classes=params.get("region_classes", "gt"),
        fill=params.get("fill", "mean"),
        prefix=params.get("prefix") or "cam",
        overwrite=bool(params.get("overwrite", False)),
        retry_failed=bool(params.get("retry_failed", False)),
        num_shards=int(params.get("num_shards") or 1),
        shard=params.get("shard"),
    )
    # what only Python callers and queued shards pass
    for name in (
        "model", "seed", "classes", "label_field", "mask_values", "heatmap_threshold",
        "run_key", "batch_size", "num_workers", "device",
    ):
        if params.get(name) is not None:
            kwargs[name] = params[name]
    return kwargs


CONTEXT_TYPES = (fo.Segmentation, fo.Detections, fo.Polylines)


def compute_context_inputs(ctx, inputs):
    """The compute_context form. Returns True when complete and valid."""
    samples = ctx.target_view()
    heatmap_field = heatmap_field_input(ctx, inputs, samples)
    if heatmap_field is None:
        return False
    contexts = _fields_of(samples, CONTEXT_TYPES)
    prop = inputs.enum(
        "context_field", _dropdown(contexts).values(), required=True, label="Context labels",
        description="A semantic segmentation (grass, sky, road...) or objects whose classes "
        "name what the map looks at",
        view=_dropdown(contexts),
    )
    if not contexts:
        prop.invalid = True
        prop.error_message = "These samples have no segmentation, detections or polylines"
        return False
    inputs.float(
        "min_share", default=0.01, min=0, max=1, label="Smallest share stored",
        description="Context classes with less of the map are left out",
    )
    key = f"{heatmap_field}_context"
    try:
        cam_plugin.check_fields(
            ctx.dataset, key,
            {key: (fo.EmbeddedDocumentField, fo.Classifications), f"{key}_error": (fo.StringField, None)},
        )
    except cam_plugin.RunError as e:
        prop = inputs.view("taken", types.Warning(label="Cannot write the context field", description=str(e)))
        prop.invalid = True
        return False
    run_options_inputs(inputs, "Delete the earlier context run of this field and measure again")
    return ctx.params.get("context_field") in contexts


def compute_context_kwargs(params):
    kwargs = dict(
        heatmap_field=params.get("heatmap_field", "cam"),
        context_field=params.get("context_field") or None,
        min_share=float(params.get("min_share", 0.01)),
        overwrite=bool(params.get("overwrite", False)),
        retry_failed=bool(params.get("retry_failed", False)),
        num_shards=int(params.get("num_shards") or 1),
        shard=params.get("shard"),
    )
    for name in ("classes", "run_key", "batch_size", "device"):
        if params.get(name) is not None:
            kwargs[name] = params[name]
    return kwargs


#: the layout of the per-class reliance chart
RELIANCE_PLOT_LAYOUT = {
    "yaxis": {"title": {"text": "mean background reliance"}, "range": [-1.05, 1.05], "zeroline": True},
    "xaxis": {"title": {"text": "class"}, "type": "category"},
    "height": 300,
    "margin": {"t": 20, "l": 70, "b": 60, "r": 20},
    "barmode": "group",
    "legend": {"orientation": "h", "y": 1.12},
}


def reliance_traces(rows):
    """Plotly traces of :func:`cam_plugin.reliance_summary`: mean reliance
    per class (+1: the background carries the predictions) and, with
    ground truth, the background gap."""
    traces = [
        {
            "type": "bar",
            "name": "mean reliance",
            "x": [r.class_name for r in rows],
            "y": [r.mean_reliance for r in rows],
            "ids": [r.class_name for r in rows],
            "marker": {"color": [BAR_COLOR if r.enough_samples else FEW_SAMPLES_COLOR for r in rows]},
            "customdata": [[r.samples, r.bg_flip_rate, r.obj_flip_rate] for r in rows],
            "hovertemplate": "%{x}: reliance %{y:+.2f} over %{customdata[0]} samples; the prediction "
            "changes without the background for %{customdata[1]:.0%}, without the object for "
            "%{customdata[2]:.0%}<extra></extra>",
        }
    ]
    if rows and rows[0].background_gap is not None:
        traces.append(
            {
                "type": "bar",
                "name": "background gap",
                "x": [r.class_name for r in rows],
                "y": [r.background_gap for r in rows],
                "marker": {"color": "#3f7fbf"},
                "hovertemplate": "%{x}: accuracy drops by %{y:.0%} without its background<extra></extra>",
            }
        )
    return traces


def reliance_note(rows, prefix):
    tested = sum(r.samples for r in rows)
    return (
        f"**{prefix}_bg_reliance**: {tested} samples tested in {len(rows)} classes. Reliance = "
        "(p without the object - p without the background) / p: +1 when the background carries "
        "the prediction, -1 when the object does. Click a bar to see the class's samples, most "
        "background-reliant first."
    )


CONTEXT_MATRIX_LAYOUT = {
    "height": 360,
    "margin": {"t": 20, "l": 110, "b": 90, "r": 20},
    "xaxis": {"title": {"text": "context class"}, "type": "category", "tickangle": -40},
    "yaxis": {"title": {"text": "class"}, "type": "category", "autorange": "reversed"},
}


def context_traces(rows, max_contexts=12):
    """The class-by-context matrix of :func:`cam_plugin.context_summary`
    as a Plotly heatmap: a cell is the mean share of a class's attention
    on a context class (the ``max_contexts`` context classes with the most
    attention overall)."""
    totals = {}
    for r in rows:
        for name, share in r.shares.items():
            totals[name] = totals.get(name, 0.0) + share * r.samples
    contexts = sorted(totals, key=lambda n: -totals[n])[:max_contexts]
    z = [[r.shares.get(c, 0.0) for c in contexts] for r in rows]
    wrong = [[r.misclassified_shares.get(c, 0.0) for c in contexts] for r in rows]
    return [
        {
            "type": "heatmap",
            "x": contexts,
            "y": [r.class_name for r in rows],
            "z": z,
            "zmin": 0,
            "zmax": max([max(row) for row in z] + [0.01]),
            "colorscale": "Viridis",
            "customdata": [[[v, r.samples, r.misclassified] for v in w] for w, r in zip(wrong, rows)],
            "hovertemplate": "%{y}: %{z:.0%} of the attention on %{x} (%{customdata[0]:.0%} among "
            "its %{customdata[2]} misclassified of %{customdata[1]})<extra></extra>",
            "colorbar": {"tickformat": ".0%"},
        }
    ]


def context_note(rows, heatmap_field):
    top = max(rows, key=lambda r: r.top[1], default=None)
    example = ""
    if top is not None and top.top[0] is not None:
        name, share = top.top
        wrong = top.misclassified_shares.get(name)
        example = f" For **{top.class_name}**, {share:.0%} of the attention falls on **{name}**" + (
            f"; {wrong:.0%} among the misclassified." if wrong is not None and top.misclassified else "."
        )
    return (
        f"**{heatmap_field}_context**: the mean share of each class's attention on each context "
        f"class.{example} Click a cell to see those samples, most attention on it first."
    )


def context_grouping(samples, heatmap_field):
    """``"gt"`` when the field's run has ground truth, else ``"pred"``: how
    the panel's context matrix groups samples."""
    return "gt" if cam_plugin.views.describe_field(samples, heatmap_field).label_field else "pred"


def panel_context_summary(samples, heatmap_field):
    """The context summary the panel shows for a field, or [] when no
    context run measured it."""
    try:
        return cam_plugin.context_summary(samples, heatmap_field, by=context_grouping(samples, heatmap_field))
    except cam_plugin.views.ViewsError:
        return []


def discover_cues_inputs(ctx, inputs):
    """The discover_cues form. Returns True when complete and valid."""
    samples = ctx.target_view()
    heatmap_field = heatmap_field_input(ctx, inputs, samples)
    if heatmap_field is None:
        return False
    runs = {config.get("heatmap_field"): config for config in cam_prediction_fields(samples).values()}
    config = runs.get(heatmap_field)
    if config is None:
        prop = inputs.view(
            "no_cam_run",
            types.Warning(
                label="No single-label CAM run made this field",
                description="Cue discovery uses the CAM run's model and layer: run 'Compute class "
                "activation maps' first",
            ),
        )
        prop.invalid = True
        return False
    if not _reloadable_model(inputs, config, "discover_cues"):
        return False
    inputs.view("model", types.Notice(label=f"Model: {config['model_spec']}, layer {config.get('layer')}"))

    regions = _fields_of(samples, cam_plugin.REGION_TYPES)
    region_default = _measured_region(samples, heatmap_field, regions)
    inputs.enum(
        "region_field", _dropdown(regions).values(), default=region_default, label="Object regions",
        description="Hotspots are the places off these objects (none: anywhere in the image)",
        view=_dropdown(regions),
    )
    contexts = _fields_of(samples, CONTEXT_TYPES)
    inputs.enum(
        "context_field", _dropdown(contexts).values(), default=_context_of(samples, heatmap_field, contexts),
        label="Context labels",
        description="Labels that name the cues (grass, sky...); none: cue 1, cue 2...",
        view=_dropdown(contexts),
    )
    inputs.int(
        "num_groups", default=0, min=0, max=50, label="Number of cues",
        description="0 chooses it from the data",
    )
    inputs.float(
        "min_share", default=0.05, min=0, max=1, label="Smallest hotspot",
        description="The least share of a map's mass a hotspot holds",
    )
    key = f"{heatmap_field}_cues"
    brain_prop = inputs.str(
        "brain_key", default=f"{key}_viz", label="Embeddings key",
        description="The key of the hotspots' visualization in the Embeddings panel",
    )
    brain_key = ctx.params.get("brain_key") or f"{key}_viz"
    ours = (cam_plugin.get_run(samples, key).get("brain_keys") or []) if key in cam_plugin.list_runs(samples, "cues") else []
    if not brain_key.isidentifier() or (brain_key in ctx.dataset.list_brain_runs() and brain_key not in ours):
        brain_prop.invalid = True
        brain_prop.error_message = (
            f"'{brain_key}' is taken by another brain run" if brain_key.isidentifier()
            else "Use letters, digits and underscores"
        )
        return False
    output = cam_plugin.hotspots_field(heatmap_field)
    try:
        cam_plugin.check_fields(
            ctx.dataset, key,
            {output: (fo.EmbeddedDocumentField, fo.Detections), f"{output}_error": (fo.StringField, None)},
        )
    except cam_plugin.RunError as e:
        prop = inputs.view("taken", types.Warning(label="Cannot write the hotspots field", description=str(e)))
        prop.invalid = True
        return False
    run_options_inputs(inputs, "Delete the earlier cue run of this field and discover again")
    return True


def _context_of(samples, heatmap_field, contexts):
    for key in cam_plugin.list_runs(samples, "context"):
        config = cam_plugin.get_run(samples, key)
        if config.get("heatmap_field") == heatmap_field and config.get("context_field") in contexts:
            return config["context_field"]
    return None


def discover_cues_kwargs(params):
    kwargs = dict(
        heatmap_field=params.get("heatmap_field", "cam"),
        region_field=params.get("region_field") or None,
        context_field=params.get("context_field") or None,
        num_groups=int(params.get("num_groups") or 0) or None,
        min_share=float(params.get("min_share", 0.05)),
        # (False, from Python or a delegated call: no visualization)
        brain_key=params.get("brain_key") if params.get("brain_key") is False else params.get("brain_key") or None,
        overwrite=bool(params.get("overwrite", False)),
        retry_failed=bool(params.get("retry_failed", False)),
        num_shards=int(params.get("num_shards") or 1),
        shard=params.get("shard"),
    )
    for name in ("model", "region_classes", "fraction", "max_on_object", "dims", "seed", "label_field",
                 "run_key", "batch_size", "num_workers", "device", "classes"):
        if params.get(name) is not None:
            kwargs[name] = params[name]
    return kwargs


def cue_fields(samples):
    """The heatmap fields with a cue run, in name order."""
    return sorted(
        {cam_plugin.get_run(samples, key).get("heatmap_field") for key in cam_plugin.list_runs(samples, "cues")} - {None}
    )


def cue_group_markdown(group):
    """One cue group as the Cues panel shows it: its numbers, the classes it
    affects and its typical hotspots."""
    from urllib.parse import quote

    def top(counts, n=3):
        return ", ".join(f"{name} ({count})" for name, count in list(counts.items())[:n]) or "none"

    lines = [
        f"#### {group.group}. {group.name}",
        f"**{group.size}** hotspots in **{group.samples}** samples; **{group.mistakes}** of them "
        f"misclassified ({group.mistake_rate:.0%})"
        + (f"; mean background reliance {group.mean_reliance:+.2f}" if group.mean_reliance is not None else ""),
        f"Predicted: {top(group.pred_classes)} · Ground truth: {top(group.gt_classes)}",
    ]
    if group.strip:
        lines.append(f"![hotspots of {group.name}](/media?filepath={quote(group.strip)})")
    return "\n\n".join(lines)
