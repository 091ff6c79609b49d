"""Models saved with ``torch.export`` (``.pt2`` archives): checked before
they are loaded, and made hookable.

``torch.export.load`` is not safe on a file from elsewhere: torch's own
documentation warns that it "uses pickle under the hood", and a crafted
archive can get code run by several routes (weights or constants flagged
``use_pickle``, opaque objects, a sample-inputs blob that fails the
weights-only unpickler and is retried without it, operator names resolved
by ``getattr`` from the ``torch`` module, shape expressions parsed by
``sympy.sympify``, which evaluates Python, guard code, AOTInductor
packages, which load a shared library, input/output tree specs whose
enum keys and ``defaultdict`` factories are imported by module name,
zip entries that torch's reader finds under another name than Python's,
and ``aten`` operators that open a file the graph names).
:func:`check_archive` therefore reads the archive as data first (through
torch's own zip reader) and refuses anything outside what a
plain ``torch.export.save`` of an ordinary network writes: tensors stored
raw, ``torch.ops.aten`` operators and a few ``operator``/``math``
functions, shape expressions made of symbols, numbers and sympy's
arithmetic, and no guard code or compiled code. Only then does
:func:`load_exported` call ``torch.export.load``.

An exported program is one flat graph; ``torch.export.unflatten`` rebuilds
the module hierarchy with the original names (``layer4``, ``layer4.1``),
whose submodules take ordinary forward hooks and pass gradients, so CAM
methods see it as any eager module.
"""

import io
import json
import re
import zipfile

import torch


class ExportedProgramError(ValueError):
    """An exported program that is refused or cannot be used, saying why."""


# operators callable from a checked graph besides torch.ops.aten.*
_OPERATOR_FUNCTIONS = {
    "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "neg", "pow",
    "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_", "abs", "pos",
}
_MATH_FUNCTIONS = {"ceil", "floor", "sqrt", "trunc", "exp", "log", "pow", "fabs"}
# aten operators that open a file named by their argument: from_file with
# shared=True maps it writable (and creates it), so a graph of them writes
# any bytes to any path (a .pth file, a shell profile) when it runs
_FILE_OPERATORS = {"from_file", "save"}
_ATEN_TARGET = re.compile(r"torch\.ops\.aten\.[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")
_SYM_TARGET = re.compile(r"torch\.(sym_(max|min|float|int|not|ite|sum|sqrt)|_sym_sqrt)")

# names a shape expression may use: sympy's constructors and arithmetic and
# torch's symbolic shape functions (those torch's deserializer knows)
_EXPRESSION_NAMES = {
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max",
    "Min", "Abs", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not",
    "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan",
    "Equality", "Unequality", "Piecewise", "ITE", "floor", "ceiling", "oo",
    "zoo", "nan", "true", "false", "True", "False", "None", "positive",
    "negative", "integer", "real", "finite", "nonnegative", "nonpositive",
    "zero", "nonzero", "even", "odd", "commutative", "precision", "evaluate",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv",
    "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural",
    "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat",
    "OpaqueUnaryFn_sqrt", "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or",
    "Identity",
}
_SYMBOL_NAME = re.compile(r"[a-z]{1,6}\d+")
_QUOTED_SYMBOL = re.compile(r"'[a-z]{1,6}\d+'|\"[a-z]{1,6}\d+\"")
_EXPRESSION_CHARS = re.compile(r"[A-Za-z0-9_+\-*/%(),.<>=!&|~ ]*")
_IDENTIFIER = re.compile(r"(?<![\w])[A-Za-z_][A-Za-z0-9_]*")

# the pytree node types whose tree specs torch rebuilds without importing
# anything: their context is plain JSON (or, for namedtuple, a name looked
# up among registered types). A defaultdict's context names a module that
# torch imports for its default factory.
_TREESPEC_TYPES = {
    None, "builtins.tuple", "builtins.list", "builtins.dict",
    "collections.OrderedDict", "collections.namedtuple", "collections.deque",
    "torch.fx.immutable_collections.immutable_list",
    "torch.fx.immutable_collections.immutable_dict", "torch.Size",
}

# the files a plain torch.export.save writes, below the archive's root
_ALLOWED = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/[\w.-]+\.json|data/weights/[\w.-]+|data/constants/[\w.-]+"
    r"|data/sample_inputs/[\w.-]+\.pt|extra/[^\x00]+"
)


def is_exported_program_file(path):
    """Whether ``path`` is a ``torch.export`` archive (``torch.export.save``),
    from its zip listing and its format marker alone: nothing in it is
    loaded."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            root, names = _split_root(z.namelist())
            if root is None or "archive_format" not in names:
                return False
            if not any(n.startswith("models/") and n.endswith(".json") for n in names):
                return False
            return z.read(root + "archive_format").strip() == b"pt2"
    except (OSError, zipfile.BadZipFile, KeyError, UnicodeDecodeError):  # an undecodable name
        return False


def _split_root(namelist):
    # torch writes every entry below one folder named after the file
    roots = {n.split("/", 1)[0] for n in namelist}
    if len(roots) != 1 or any("/" not in n for n in namelist):
        return None, set()
    (root,) = roots
    return root + "/", {n[len(root) + 1 :] for n in namelist}


def check_archive(path):
    """Reads a ``.pt2`` archive as data and refuses it unless loading it
    with ``torch.export.load`` can only build tensors and a graph of
    ``torch.ops.aten`` operators (see the module docstring).

    Raises:
        ExportedProgramError: saying what was found
    """
    def refuse(what):
        raise ExportedProgramError(
            f"{path} is not loaded because {what}; loading it would let code "
            "from the file run. Only archives that torch.export.save writes "
            "for an ordinary network (standard operators, raw tensors) are "
            "opened; if you trust the file, load it yourself "
            "(torch.export.load) and pass the program, or pass "
            "trust_checkpoint=True from Python"
        )

    try:
        with open(path, "rb") as f:
            head = f.read(4)
        z = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError) as e:  # UnicodeDecodeError: an undecodable entry name
        raise ExportedProgramError(f"Cannot read {path} as a .pt2 archive: {e}") from None

    with z:
        # torch.export.save starts the file with its first entry; data before
        # it lets the file be something else too (an ELF shared library that
        # a crafted archive gets loaded by its own path)
        if head != b"PK\x03\x04":
            refuse("it has data before its first zip entry, which torch.export.save never writes")
        root, names = _split_root(z.namelist())
        if root is None:
            refuse("its files are not under one root folder, as torch.export.save writes them")

        # torch.export.load reads the archive with its own zip reader (miniz,
        # torch._C.PyTorchFileReader), which finds an entry by name ignoring
        # case, and which lists a name only up to a NUL byte, as Python's
        # zipfile does, but looks it up whole: with two such names this
        # check would read one entry and torch another.
        # So entries must be listed alike by both readers and be unique
        # ignoring case, and everything checked is read through torch's
        # reader, byte for byte what torch.export.load reads.
        try:
            reader = torch._C.PyTorchFileReader(str(path))
            records = reader.get_all_records()
        except Exception as e:  # noqa: BLE001
            raise ExportedProgramError(f"Cannot read {path} as a .pt2 archive: {e}") from None
        listed = sorted(n[len(root) :] for n in z.namelist())
        if sorted(records) != listed:
            refuse("torch's zip reader lists other entries than Python's")
        lowered = [n.lower() for n in listed]
        if len(set(lowered)) != len(lowered):
            twice = sorted({n for n in listed if lowered.count(n.lower()) > 1})
            refuse(
                f"it holds entries whose names are equal or differ only in case ({', '.join(twice)}), "
                "and torch reads another of them than the one checked"
            )

        def read(name):
            return reader.get_record(name)

        for name in sorted(names):
            if name.startswith("data/aotinductor/") or name.endswith((".so", ".dll", ".dylib")):
                refuse(f"it holds compiled code ({name}), which loading would run")
            if not _ALLOWED.fullmatch(name):
                refuse(f"it holds a file that torch.export.save does not write ({name})")

        models = sorted(n[len("models/") : -len(".json")] for n in names if n.startswith("models/"))
        if not models:
            raise ExportedProgramError(f"{path} holds no exported program (no models/*.json)")

        def read_json(name):
            try:
                return json.loads(read(name).decode("utf-8"))
            except (RuntimeError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ExportedProgramError(f"{path}: cannot read {name} ({e})") from None

        for model in models:
            for legacy in (f"data/weights/{model}.pt", f"data/constants/{model}.pt"):
                if legacy in names:
                    refuse(f"it stores {legacy} in the legacy pickled format")

            weights = read_json(f"data/weights/{model}_weights_config.json")
            constants = read_json(f"data/constants/{model}_constants_config.json")
            for kind, config in (("weight", weights), ("constant", constants)):
                entries = config.get("config") if isinstance(config, dict) else None
                if not isinstance(entries, dict):
                    refuse(f"its {kind}s' configuration is not a mapping")
                for fqn, meta in entries.items():
                    if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
                        refuse(f"its {kind} '{fqn}' is stored as a pickle")
                    prefix = "weight_" if kind == "weight" else "tensor_"
                    if not str(meta.get("path_name", "")).startswith(prefix):
                        refuse(f"its {kind} '{fqn}' is not a tensor ({meta.get('path_name')})")

            sample = f"data/sample_inputs/{model}.pt"
            if sample in names:
                try:
                    torch.load(io.BytesIO(read(sample)), weights_only=True)
                except Exception as e:  # noqa: BLE001
                    refuse(
                        f"its sample inputs are not plain tensors ({type(e).__name__}), and "
                        "torch would retry them with the full unpickler"
                    )

            _check_program(read_json(f"models/{model}.json"), refuse)


def _check_program(program, refuse):
    if not isinstance(program, dict):
        refuse("its program is not a JSON object")
    if program.get("guards_code"):
        refuse("it carries guard code, which torch turns into Python and runs")
    ranges = program.get("range_constraints") or {}
    if not isinstance(ranges, dict):
        refuse("its shape ranges are not a mapping")
    for expr in ranges:
        _check_expression(expr, refuse)

    def walk(value):
        if isinstance(value, dict):
            target = value.get("target")
            if isinstance(target, str) and "inputs" in value:
                _check_target(target, refuse)
            operator = value.get("as_operator")
            if operator is not None:
                _check_target(str(operator), refuse)
            expr = value.get("expr_str")
            if expr is not None:
                _check_expression(str(expr), refuse)
            for key in ("in_spec", "out_spec"):
                if key in value:
                    _check_treespec(value[key], refuse)
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(program)


def _check_target(target, refuse):
    if _ATEN_TARGET.fullmatch(target):
        # torch resolves the name by getattr from torch.ops.aten, where the
        # pattern also admits attributes that are no operator
        # (torch.ops.aten.__class__.__class__ is ``type``): the name must be
        # an aten operator and overload, and none that opens a file
        _, _, _, name, *overload = target.split(".")
        try:
            packet = getattr(torch.ops.aten, name)
        except Exception:  # noqa: BLE001
            packet = None
        if name in _FILE_OPERATORS:
            refuse(f"its graph calls {target!r}, which opens a file the graph names (and can write it)")
        if isinstance(packet, torch._ops.OpOverloadPacket) and (
            not overload or overload[0] in packet.overloads()
        ):
            return
        refuse(f"its graph calls {target!r}, which is not an aten operator")
    if _SYM_TARGET.fullmatch(target):
        return
    module, _, name = target.partition(".")
    if module == "_operator" and name in _OPERATOR_FUNCTIONS:
        return
    if module == "math" and name in _MATH_FUNCTIONS:
        return
    refuse(f"its graph calls {target!r}, which is not a standard tensor operator")


def _check_treespec(text, refuse):
    # torch.utils._pytree.treespec_loads parses each node's context with an
    # object hook that imports the module of any {"__enum__": ..., "fqn":
    # "module:attr"} and subscripts what it finds (ctypes.cdll[path] loads a
    # shared library), and a defaultdict's context names a module to import
    def visit(node):
        if not isinstance(node, dict):
            refuse("its input/output tree spec is malformed")
        kind = node.get("type")
        if not (kind is None or isinstance(kind, str)) or kind not in _TREESPEC_TYPES:
            refuse(
                f"its input/output tree spec holds a {kind!r} node, not a plain container "
                "(for a defaultdict torch imports the module the file names)"
            )
        context = node.get("context")
        if isinstance(context, str):
            try:
                context = json.loads(context)
            except json.JSONDecodeError:
                context = None  # a namedtuple's registered type name
        if _has_enum(context):
            refuse("its input/output tree spec holds an enum, whose module torch imports by the name in the file")
        for child in node.get("children_spec") or []:
            visit(child)

    try:
        _, spec = json.loads(text)
    except (TypeError, ValueError):
        refuse("its input/output tree spec is malformed")
    visit(spec)


def _has_enum(value):
    if isinstance(value, dict):
        return "__enum__" in value or any(_has_enum(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_enum(v) for v in value)
    return False


def _check_expression(expr, refuse):
    # sympy.sympify evaluates the text as Python: only symbols, numbers and
    # whitelisted sympy names may appear, quoted text only as symbol names
    text = _QUOTED_SYMBOL.sub("S0", expr)
    bad = not _EXPRESSION_CHARS.fullmatch(text) or "__" in text
    if not bad:
        for name in _IDENTIFIER.findall(text):
            if name not in _EXPRESSION_NAMES and not _SYMBOL_NAME.fullmatch(name) and name != "S0":
                bad = True
                break
    if bad:
        refuse(f"its shape expression {expr[:80]!r} is not plain arithmetic")


def load_exported(path, trust=False):
    """Loads a ``torch.export`` archive as a hookable module.

    Args:
        path: the ``.pt2`` file
        trust (False): skip :func:`check_archive` (for a file you trust)

    Returns:
        the module of :func:`hookable_exported`

    Raises:
        ExportedProgramError: for a refused, unreadable or unusable program
    """
    if not trust:
        check_archive(path)
    try:
        program = torch.export.load(path)
    except Exception as e:  # noqa: BLE001
        # torch raises many types for an archive it cannot deserialise
        raise ExportedProgramError(
            f"Cannot load {path} as an exported program ({type(e).__name__}: {e})"
        ) from None
    return hookable_exported(program, source=path)


def hookable_exported(program, source="the exported program"):
    """The module hierarchy of an ``ExportedProgram`` with its original
    submodule names (``torch.export.unflatten``), which take forward hooks.

    The result has ``exported_input_shape``: the (C, H, W) of its image
    input, each entry an int where the export fixed it and None where it
    is dynamic.

    Raises:
        ExportedProgramError: for a program without exactly one 4-d tensor
            input, or one exported with a fixed batch size
    """
    from torch.export.graph_signature import InputKind

    user_inputs = [s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    shapes = []
    for name in user_inputs:
        val = nodes[name].meta.get("val") if name in nodes else None
        shapes.append(tuple(val.shape) if isinstance(val, torch.Tensor) else None)
    if len(shapes) != 1 or shapes[0] is None or len(shapes[0]) != 4:
        raise ExportedProgramError(
            f"{source} takes {len(shapes)} input(s) "
            f"({', '.join(str(s) for s in shapes) or 'none'}); a classifier "
            "exported for CAMs takes one (batch, channels, height, width) image tensor"
        )

    (shape,) = shapes
    if isinstance(shape[0], int):
        raise ExportedProgramError(
            f"{source} was exported with a fixed batch size of {shape[0]}, but "
            "CAM methods run batches of other sizes. Export it with a dynamic "
            "batch dimension: torch.export.export(model, (example,), "
            "dynamic_shapes=({0: torch.export.Dim('batch')},))"
        )

    try:
        module = torch.export.unflatten(program)
    except Exception as e:  # noqa: BLE001
        raise ExportedProgramError(
            f"Cannot rebuild the modules of {source} ({type(e).__name__}: {e})"
        ) from None
    module.exported_input_shape = tuple(d if isinstance(d, int) else None for d in shape[1:])
    return module


def default_transforms(module):
    """The preprocessing for an exported module: the ImageNet resize, crop
    and normalisation, at the input size the export fixed (224 x 224 where
    it is dynamic)."""
    import torchvision.transforms as T

    from ..cifar_resnet import IMAGENET_MEAN, IMAGENET_STD

    _, h, w = getattr(module, "exported_input_shape", (3, None, None))
    h, w = h or w or 224, w or h or 224
    resize = max(1, int(round(min(h, w) * 256 / 224)))
    return T.Compose(
        [
            T.Resize(resize),
            T.CenterCrop((h, w)),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
