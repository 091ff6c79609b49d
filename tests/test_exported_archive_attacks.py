""".pt2 archives crafted to get code run by torch.export.load (or by the
graph it loads), each refused by check_archive before anything in it runs.

Every archive starts from a real torch.export.save of a small network with
a dynamic batch dimension and is then edited. Each test first shows that
the route is live in torch (torch.export.load, or running the loaded
program, creates the marker), then that cam_plugin.load_classifier refuses
the file, names the problem and leaves no marker."""

import io
import json
import pickle
import shutil
import subprocess
import uuid
import zipfile

import pytest
import torch

import cam_plugin
from cam_plugin.models import is_exported_program_file


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(0)
    program = torch.export.export(
        _Net().eval(), (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    path = tmp_path_factory.mktemp("pt2") / "net.pt2"
    torch.export.save(program, str(path))
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i.filename)) for i in z.infolist()]


class _Marker:
    """Unpickling it appends a line to ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'a').write('pickle ran\\n')",))


def _pickled(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _write(path, entries):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries:
            z.writestr(name, data)
    return str(path)


def _edit_model(entries, change):
    out = []
    for name, data in entries:
        if name.endswith("/models/model.json"):
            program = json.loads(data)
            change(program)
            data = json.dumps(program).encode()
        out.append((name, data))
    return out


def _set_input_context(context):
    """Sets the context of the kwargs dict in the program's input tree spec."""

    def change(program):
        signature = program["graph_module"]["module_call_graph"][0]["signature"]
        spec = json.loads(signature["in_spec"])
        spec[1]["children_spec"][1]["context"] = json.dumps(context)
        signature["in_spec"] = json.dumps(spec)

    return change


def _module(tmp_path, monkeypatch, marker, body=""):
    """A module on sys.path whose import writes the marker; returns its name."""
    name = f"crafted_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(
        f"open({str(marker)!r}, 'a').write('imported\\n')\nimport enum\n"
        "class E(enum.Enum):\n    A = 1\n" + body
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _refused(path, marker, message):
    assert is_exported_program_file(path)
    with pytest.raises(cam_plugin.ModelError, match=message):
        cam_plugin.load_classifier(path)
    assert not marker.exists(), "code from the refused archive ran"


def _live(marker, load):
    """Shows that torch runs the archive's code: ``load()`` creates the marker."""
    assert not marker.exists()
    try:
        load()
    except Exception:  # noqa: BLE001 - some crafted archives fail after their code ran
        pass
    assert marker.exists(), "the crafted archive no longer runs code in torch"
    marker.unlink()


def _evil_weights_config(entries, marker):
    # conv.weight read with the full unpickler
    config = json.loads(dict(entries)["net/data/weights/model_weights_config.json"])
    config["config"]["conv.weight"].update(use_pickle=True, path_name="weight_evil")
    return json.dumps(config).encode(), ("net/data/weights/weight_evil", _pickled(_Marker(marker)))


@pytest.mark.parametrize("variant", ["MODEL_weights_config.json", "model_weights_config.JSON"])
def test_config_under_another_case(base, tmp_path, variant):
    # torch's zip reader finds data/weights/model_weights_config.json
    # ignoring case: with a second entry whose name differs only in case it
    # reads that one, which this check (by Python's zipfile) never did
    marker = tmp_path / "marker"
    evil, weight = _evil_weights_config(base, marker)
    entries = []
    for name, data in base:
        entries.append((name, data))
        if name.endswith("/model_weights_config.json"):
            entries.append((f"net/data/weights/{variant}", evil))
    path = _write(tmp_path / "case.pt2", entries + [weight])
    _live(marker, lambda: torch.export.load(path))
    _refused(path, marker, "differ only in case")


def test_config_named_twice_through_a_nul_byte(base, tmp_path):
    # Python's zipfile cuts a name at a NUL byte and reads the last of two
    # equal names; torch's reader finds the entry whose name has no NUL
    marker = tmp_path / "marker"
    evil, weight = _evil_weights_config(base, marker)
    config = "net/data/weights/model_weights_config.json"
    entries = []
    for name, data in base:
        entries += [(config, evil), (config + "#", data)] if name == config else [(name, data)]
    path = _write(tmp_path / "nul.pt2", entries + [weight])
    raw = open(path, "rb").read().replace((config + "#").encode(), (config + "\0").encode())
    open(path, "wb").write(raw)
    _live(marker, lambda: torch.export.load(path))
    _refused(path, marker, "equal or differ only in case")


def test_enum_in_the_input_tree_spec_imports_a_module(base, tmp_path, monkeypatch):
    # treespec_loads imports the module of an {"__enum__": ..., "fqn": ...}
    marker = tmp_path / "marker"
    context = [{"__enum__": True, "fqn": f"{_module(tmp_path, monkeypatch, marker)}:E", "name": "A"}]
    path = _write(tmp_path / "enum.pt2", _edit_model(base, _set_input_context(context)))
    _live(marker, lambda: torch.export.load(path))
    context = [{"__enum__": True, "fqn": f"{_module(tmp_path, monkeypatch, marker)}:E", "name": "A"}]
    path = _write(tmp_path / "enum.pt2", _edit_model(base, _set_input_context(context)))
    _refused(path, marker, "tree spec holds an enum")


def test_defaultdict_in_the_input_tree_spec_imports_a_module(base, tmp_path, monkeypatch):
    marker = tmp_path / "marker"

    def crafted():
        context = {
            "default_factory_module": _module(tmp_path, monkeypatch, marker),
            "default_factory_name": "E",
            "dict_context": [],
        }

        def change(program):
            signature = program["graph_module"]["module_call_graph"][0]["signature"]
            spec = json.loads(signature["in_spec"])
            spec[1]["children_spec"][1] = {
                "type": "collections.defaultdict", "context": context, "children_spec": [],
            }
            signature["in_spec"] = json.dumps(spec)

        return _write(tmp_path / "defaultdict.pt2", _edit_model(base, change))

    _live(marker, lambda: torch.export.load(crafted()))
    _refused(crafted(), marker, "collections.defaultdict")


@pytest.mark.skipif(not shutil.which("cc"), reason="needs a C compiler for the shared library")
def test_archive_that_is_also_a_shared_library_loads_itself(base, tmp_path):
    # the enum hook subscripts what it finds: ctypes.cdll[path] dlopens the
    # path, here the .pt2 itself, an ELF library with the zip appended
    marker = tmp_path / "marker"
    source = tmp_path / "lib.c"
    source.write_text(
        "#include <stdio.h>\n__attribute__((constructor)) static void run(void) {"
        f' FILE *f = fopen("{marker}", "a"); if (f) {{ fputs("library ran\\n", f); fclose(f); }} }}\n'
    )

    def crafted(path):
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(path), str(source)], check=True)
        context = [{"__enum__": True, "fqn": "ctypes:cdll", "name": str(path)}]
        with zipfile.ZipFile(path, "a") as z:
            for name, data in _edit_model(base, _set_input_context(context)):
                z.writestr(name, data)
        return str(path)

    _live(marker, lambda: torch.export.load(crafted(tmp_path / "poly.pt2")))
    # another file: the library above stays loaded in this process
    _refused(crafted(tmp_path / "poly2.pt2"), marker, "data before its first zip entry")


def _from_file_nodes(target, payload):
    """Graph nodes that map ``target`` writable with aten.from_file and fill
    it with ``payload``, byte by byte."""

    def meta(sizes):
        return {
            "dtype": 1, "sizes": [{"as_int": s} for s in sizes], "requires_grad": False,
            "device": {"type": "cpu", "index": None}, "strides": [{"as_int": 1}] * len(sizes),
            "storage_offset": {"as_int": 0}, "layout": 7,
        }

    def node(target, inputs, name):
        # kind 2: a keyword-only argument (dtype)
        return {
            "target": target,
            "inputs": [{"name": k, "arg": v, "kind": 2 if k == "dtype" else 1} for k, v in inputs],
            "outputs": [{"as_tensor": {"name": name}}], "name": name,
            "metadata": {"nn_module_stack": "L__self__,,tests._Net"},
            "is_hop_single_tensor_return": None,
        }

    nodes = [node("torch.ops.aten.from_file.default", [
        ("filename", {"as_string": target}), ("shared", {"as_bool": True}),
        ("size", {"as_int": len(payload)}), ("dtype", {"as_scalar_type": 1}),
    ], "mapped")]
    values = {"mapped": meta([len(payload)])}
    for i, byte in enumerate(payload):
        nodes.append(node("torch.ops.aten.select.int", [
            ("self", {"as_tensor": {"name": "mapped"}}), ("dim", {"as_int": 0}), ("index", {"as_int": i}),
        ], f"byte{i}"))
        nodes.append(node("torch.ops.aten.fill_.Scalar", [
            ("self", {"as_tensor": {"name": f"byte{i}"}}), ("value", {"as_int": byte}),
        ], f"fill{i}"))
        values[f"byte{i}"] = values[f"fill{i}"] = meta([])
    return nodes, values


def test_graph_that_writes_a_file(base, tmp_path):
    # only aten operators, but aten.from_file(shared=True) creates and maps
    # any file writable: running the graph writes bytes of the file's choice
    # there (a .pth in site-packages, a shell profile)
    marker = tmp_path / "marker"

    def change(program):
        graph = program["graph_module"]["graph"]
        nodes, values = _from_file_nodes(str(marker), b"import os\n")
        graph["nodes"] = nodes + graph["nodes"]
        graph["tensor_values"].update(values)

    path = _write(tmp_path / "from_file.pt2", _edit_model(base, change))
    _live(marker, lambda: torch.export.load(path).module()(torch.randn(2, 3, 16, 16)))
    _refused(path, marker, "from_file.*opens a file")


def test_graph_that_imports_an_autograd_function(base, tmp_path, monkeypatch):
    # torch's verifier admits this function, which imports a module by name
    # and calls its .apply; refused as before (not an aten operator)
    marker = tmp_path / "marker"
    body = "class F:\n    @staticmethod\n    def apply(x):\n        return x\n"

    def crafted():
        name = _module(tmp_path, monkeypatch, marker, body)

        def change(program):
            node = program["graph_module"]["graph"]["nodes"][1]
            node["target"] = "torch.export.custom_ops._call_custom_autograd_function_in_pre_dispatch"
            node["inputs"] = [
                {"name": "function_cls_name", "arg": {"as_string": f"{name}.F"}, "kind": 1},
                {"name": "x", "arg": node["inputs"][0]["arg"], "kind": 1},
            ]

        return _write(tmp_path / "autograd.pt2", _edit_model(base, change))

    _live(marker, lambda: torch.export.load(crafted()).module()(torch.randn(2, 3, 16, 16)))
    _refused(crafted(), marker, "_call_custom_autograd_function_in_pre_dispatch")


def test_opaque_constant_not_flagged_as_pickle(base, tmp_path):
    # torch picks pickle.loads by the constant's file name (opaque_obj_*),
    # whatever use_pickle says; refused as before (not a tensor)
    marker = tmp_path / "marker"
    weights = json.loads(dict(base)["net/data/weights/model_weights_config.json"])
    meta = weights["config"]["conv.bias"]["tensor_meta"]
    constants = {"config": {"evil": {
        "path_name": "opaque_obj_0", "is_param": False, "use_pickle": False, "tensor_meta": meta,
    }}}
    entries = [
        (n, json.dumps(constants).encode() if n.endswith("model_constants_config.json") else d)
        for n, d in base
    ]
    blob = pickle.dumps(_Marker(marker))
    # torch first reads the entry as float32 raw bytes: a multiple of 4
    entries.append(("net/data/constants/opaque_obj_0", blob + b"\0" * (-len(blob) % 4)))
    path = _write(tmp_path / "opaque.pt2", entries)
    _live(marker, lambda: torch.export.load(path))
    _refused(path, marker, "'evil' is not a tensor")



class _Block(torch.nn.Module):
    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return x + self.mlp(self.norm2(x))


class _TinyViT(torch.nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.patch = torch.nn.Conv2d(3, d, 8, 8)
        self.cls = torch.nn.Parameter(torch.zeros(1, 1, d))
        self.pos = torch.nn.Parameter(torch.zeros(1, 17, d))
        self.blocks = torch.nn.Sequential(_Block(d), _Block(d))
        self.norm, self.head = torch.nn.LayerNorm(d), torch.nn.Linear(d, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def test_a_transformer_passes(tmp_path):
    # attention (nn.MultiheadAttention, scaled_dot_product_attention),
    # layer norm and GELU: an ordinary network is not refused
    from cam_plugin.cams.exported import check_archive

    program = torch.export.export(
        _TinyViT().eval(), (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    path = str(tmp_path / "vit.pt2")
    torch.export.save(program, path)
    check_archive(path)
    clf = cam_plugin.load_classifier(path)
    assert "blocks.1.attn" in dict(clf.module.named_modules())


def test_an_undecodable_entry_name_is_a_model_error(base, tmp_path):
    # an entry flagged UTF-8 whose name is not: Python's zipfile raises
    # UnicodeDecodeError on opening it, which must surface as a refusal
    # that names the file, not as a crash
    path = tmp_path / "undecodable.pt2"
    _write(path, base + [("net/extra/" + "é" * 5, b"x")])
    data = path.read_bytes()
    assert data.count("é".encode() * 5) == 2  # local header and central directory
    path.write_bytes(data.replace("é".encode() * 5, b"\xff\xfe" * 5))

    assert not is_exported_program_file(path)
    with pytest.raises(cam_plugin.ModelError, match="undecodable.pt2"):
        cam_plugin.load_classifier(path)
    with pytest.raises(cam_plugin.ModelError, match="undecodable.pt2"):
        cam_plugin.model_layers(str(path))
