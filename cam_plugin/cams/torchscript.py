"""A wrapper that gives the submodules of a loaded TorchScript model Python forward hooks.

TorchScript modules refuse ``register_forward_hook``, yet CAM methods need a
layer's output and sometimes need to replace it (with a fresh autograd leaf, or
an ablated copy). :class:`HookableScriptModule` gets there by interpreting the
model's TorchScript method graphs in Python, but only along the paths from the
root to the hooked submodules: every call that cannot reach a hooked submodule
(convolutions, whole untouched blocks, ...) runs natively, and with no hooks at
all the model runs natively end to end.

Scripted (``torch.jit.script``) and traced (``torch.jit.trace``) models are
both supported, saved and loaded or not.
"""

import collections

import torch
from torch.utils.hooks import RemovableHandle


class HookableScriptModule(torch.nn.Module):
    """Wraps a TorchScript module so that forward hooks can be put on any of
    its submodules.

    The wrapper is transparent: :meth:`named_modules`, :meth:`get_submodule`,
    :meth:`named_parameters` and :meth:`named_buffers` use the scripted
    model's own names (``"layer4.1.conv2"``, not ``"scripted.layer4.1.conv2"``)
    while ``state_dict()`` keys keep the ``scripted.`` prefix of the child.

    Args:
        scripted: a ``torch.jit.ScriptModule``, e.g. from ``torch.jit.load``
    """

    def __init__(self, scripted):
        super().__init__()
        if not isinstance(scripted, torch.jit.ScriptModule):
            raise TypeError(
                f"HookableScriptModule wraps a TorchScript module, not a {type(scripted).__name__}"
            )

        self.scripted = scripted
        # layer name -> {handle id: hook}; RemovableHandle deletes from these
        self._layer_hooks = {}
        # (TorchScript type name, method name) -> _Program; types are unique
        # within one compilation unit, hence the cache lives per wrapper
        self._programs = {}
        self._plan = None

    def forward(self, *args, **kwargs):
        hooked = frozenset(name for name, hooks in self._layer_hooks.items() if hooks)
        if not hooked:
            return self.scripted(*args, **kwargs)

        if self._plan is None or self._plan.hooked != hooked:
            self._plan = _Plan(self, hooked)

        args = _bind_arguments(self.scripted, "forward", args, kwargs)
        interpreter = _Interpreter(self, self._plan)
        try:
            return interpreter.call_method(_ModuleRef("", self.scripted), "forward", args)
        except BaseException:
            # Leave the ``with`` blocks that the exception cut short, as the
            # TorchScript interpreter does: a no_grad() block must not
            # outlive the call
            interpreter.exit_all()
            raise

    def register_layer_hook(self, name, hook):
        """Registers ``hook(module, inputs, output)`` on the submodule ``name``.

        The hook runs every time the submodule's forward returns during a
        forward pass of this wrapper; a non-None return value replaces the
        submodule's output for the rest of the computation, as with
        ``torch.nn.Module.register_forward_hook``.

        Args:
            name: a name from :meth:`named_modules`; ``""`` is the whole model
            hook: the callable

        Returns:
            a handle whose ``remove()`` removes the hook
        """
        try:
            self.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"The TorchScript model has no submodule '{name}'. Valid names include: "
                f"{', '.join(self._names_near(name))}"
            ) from None

        hooks = self._layer_hooks.setdefault(name, collections.OrderedDict())
        handle = RemovableHandle(hooks)
        hooks[handle.id] = hook
        return handle

    def named_modules(self, memo=None, prefix="", remove_duplicate=True):
        if memo is None:
            memo = set()

        if remove_duplicate:
            if self in memo:
                return
            memo.add(self)

        yield prefix, self
        for name, module in self.scripted.named_modules(memo, prefix, remove_duplicate):
            # The scripted root is an implementation detail of the wrapper
            if module is not self.scripted:
                yield name, module

    def get_submodule(self, target):
        if target == "":
            return self

        # ScriptModules refuse get_submodule, so walk their children here
        module = self.scripted
        for item in target.split("."):
            if item not in module._modules:
                raise AttributeError(
                    f"{module.original_name} has no submodule `{item}` (in '{target}')"
                )
            module = module._modules[item]

        return module

    def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
        # Delegated rather than derived from named_modules(), which leaves out
        # the scripted root and would lose the parameters it holds directly
        return self.scripted.named_parameters(prefix, recurse, remove_duplicate)

    def named_buffers(self, prefix="", recurse=True, remove_duplicate=True):
        return self.scripted.named_buffers(prefix, recurse, remove_duplicate)

    def _names_near(self, name):
        # The children of the longest existing prefix of the name: the
        # top-level layers for a typo in the first part, else its siblings
        parts = name.split(".")
        module, prefix = self.scripted, ""
        for part in parts[:-1]:
            if part not in module._modules:
                break
            module, prefix = module._modules[part], f"{prefix}{part}."

        return [prefix + child for child in module._modules.keys()] or ["(none)"]

    def _module_at(self, path):
        return self.get_submodule(path) if path else self.scripted

    def _program(self, module, method):
        key = (module._c._type().qualified_name(), method)
        program = self._programs.get(key)
        if program is None:
            program = _Program(module._c._get_method(method).graph)
            self._programs[key] = program

        return program


def _bind_arguments(module, method, args, kwargs):
    # Interpreted graphs take every argument positionally, defaults included
    schema = module._c._get_method(method).schema
    params = schema.arguments[1:]  # without self
    if len(args) > len(params):
        raise TypeError(f"{method}() takes {len(params)} arguments but {len(args)} were given")

    bound = list(args)
    kwargs = dict(kwargs)
    for param in params[len(args) :]:
        if param.name in kwargs:
            bound.append(kwargs.pop(param.name))
        elif param.has_default_value():
            bound.append(param.default_value)
        else:
            raise TypeError(f"{method}() missing argument '{param.name}'")

    if kwargs:
        raise TypeError(f"{method}() got unexpected arguments {sorted(kwargs)}")

    return bound


def _is_forward(method):
    # Tracing records the second call of a submodule as ``forward1``, the
    # third as ``forward2``, ...; each is a call of the eager module
    return method == "forward" or (method.startswith("forward") and method[7:].isdigit())


def _join(path, relative):
    if not path:
        return relative
    return f"{path}.{relative}" if relative else path


class _ModuleRef:
    """A submodule as an interpreted value: the module and its dotted path."""

    __slots__ = ("path", "module")

    def __init__(self, path, module):
        self.path = path
        self.module = module


class _Plan:
    """Which calls must be interpreted for one set of hooked submodules."""

    def __init__(self, owner, hooked):
        self.owner = owner
        self.hooked = hooked
        # Strict ancestors of hooked submodules: only their methods can lead
        # to a hooked submodule, so everything else runs natively
        self.ancestors = set()
        for name in hooked:
            if name:
                parts = name.split(".")
                self.ancestors.update(".".join(parts[:i]) for i in range(len(parts)))

        self.hook_modules = {name: owner.get_submodule(name) for name in hooked}
        self._reaches = {}

    def interprets(self, path, method):
        return path in self.ancestors and self.reaches(path, method)

    def reaches(self, path, method):
        """Whether ``method`` of the module at ``path`` may call the forward of
        a hooked submodule (statically, from its graph)."""
        key = (path, method)
        known = self._reaches.get(key)
        if known is not None:
            return known

        # Provisional answer that stops recursion on cycles
        self._reaches[key] = False
        program = self.owner._program(self.owner._module_at(path), method)
        result = False
        for target, callee_method in program.method_calls:
            if target is None:
                # A call on a module that was not fetched by a plain attribute
                # chain from self: cannot tell, so interpret
                result = True
                break

            callee = _join(path, target)
            if callee in self.hooked and _is_forward(callee_method):
                result = True
                break

            if callee in self.ancestors and self.reaches(callee, callee_method):
                result = True
                break

        self._reaches[key] = result
        return result


class _Block:
    """A compiled block of a TorchScript graph."""

    __slots__ = ("inputs", "steps", "outputs")

    def __init__(self, inputs, steps, outputs):
        self.inputs = inputs
        self.steps = steps
        self.outputs = outputs


class _Step:
    """One compiled node: its handler, the unique ids of its input and output
    values, and what the handler needs from the node."""

    __slots__ = (
        "node",
        "kind",
        "handler",
        "inputs",
        "outputs",
        "blocks",
        "name",
        "value",
        "native",
    )

    def __init__(self, node, handler, blocks):
        self.node = node
        self.kind = node.kind()
        self.handler = handler
        self.inputs = [v.unique() for v in node.inputs()]
        self.outputs = [v.unique() for v in node.outputs()]
        self.blocks = blocks
        self.name = node.s("name") if node.hasAttribute("name") else None
        self.value = None
        self.native = None


class _Program:
    """A TorchScript method graph compiled into steps for :class:`_Interpreter`.

    ``method_calls`` lists ``(target, method)`` for every ``prim::CallMethod``,
    ``target`` being the dotted path of the callee relative to ``self`` when it
    is reached by a chain of ``prim::GetAttr`` from ``self``, else None.
    """

    def __init__(self, graph):
        # Steps refer to nodes, which the graph owns
        self.graph = graph
        self.inputs = [v.unique() for v in graph.inputs()]
        self.method_calls = []
        # value id -> path relative to self, for attribute chains from self
        self._paths = {self.inputs[0]: ()} if self.inputs else {}
        self.block = _Block(
            self.inputs, self._compile_nodes(graph.nodes()), [v.unique() for v in graph.outputs()]
        )
        del self._paths

    def _compile_nodes(self, nodes):
        steps = []
        for node in nodes:
            blocks = [
                _Block(
                    [v.unique() for v in block.inputs()],
                    self._compile_nodes(block.nodes()),
                    [v.unique() for v in block.outputs()],
                )
                for block in node.blocks()
            ]
            kind = node.kind()
            if blocks and kind not in ("prim::If", "prim::Loop"):
                # Fails when run, not here: the node may sit in a branch that
                # is never taken
                handler = _Interpreter.unsupported
            else:
                handler = _HANDLERS.get(kind, _Interpreter.native)

            step = _Step(node, handler, blocks)
            if kind == "prim::Constant":
                step.value = _constant_value(node)
            elif kind in ("prim::GetAttr", "prim::CreateObject"):
                # The class of the value, for TorchScript class instances
                out_type = node.output().type()
                if isinstance(out_type, torch._C.ClassType):
                    step.value = out_type.qualified_name()

                parent = self._paths.get(step.inputs[0]) if step.inputs else None
                if parent is not None:
                    self._paths[step.outputs[0]] = parent + (step.name,)
            elif kind == "prim::CallMethod":
                target = self._paths.get(step.inputs[0])
                self.method_calls.append((None if target is None else ".".join(target), step.name))

            steps.append(step)

        return steps


def _constant_value(node):
    out = node.output()
    if out.type().kind() == "FunctionType":
        # Only prim::CallFunction uses these; it runs natively and clones the
        # constant into its own graph
        return None

    return out.toIValue()


class _Interpreter:
    """Runs compiled programs in Python for one forward pass of the wrapper."""

    def __init__(self, owner, plan):
        self.owner = owner
        self.plan = plan
        # Context managers entered by prim::Enter and not yet exited
        self.entered = []

    def call_method(self, ref, method, args):
        if self.plan.interprets(ref.path, method):
            program = self.owner._program(ref.module, method)
            out = self.run(program.block, [ref] + list(args), {})
            out = out[0] if len(out) == 1 else tuple(out)
        else:
            out = getattr(ref.module, method)(*args)

        if ref.path in self.plan.hooked and _is_forward(method):
            module = self.plan.hook_modules[ref.path]
            # Copied, so that a hook may remove itself or others while running
            for hook in list(self.owner._layer_hooks.get(ref.path, {}).values()):
                result = hook(module, tuple(args), out)
                if result is not None:
                    out = result

        return out

    def run(self, block, inputs, env):
        for uid, value in zip(block.inputs, inputs):
            env[uid] = value

        for step in block.steps:
            step.handler(self, step, env)

        return [env[uid] for uid in block.outputs]

    # Handlers: each reads its inputs from env and writes its outputs there

    def constant(self, step, env):
        value = step.value
        # Lists are mutable; a constant must not change between runs
        env[step.outputs[0]] = list(value) if isinstance(value, list) else value

    def get_attr(self, step, env):
        obj = env[step.inputs[0]]
        name = step.name
        if isinstance(obj, _ModuleRef):
            module = obj.module
            if name in module._modules:
                value = _ModuleRef(_join(obj.path, name), module._modules[name])
            else:
                _check_not_script_class(step)
                # Through _c, as Python attributes of RecursiveScriptModule
                # (graph, code, ...) could shadow the model's own attributes
                value = module._c.getattr(name)
        elif isinstance(obj, torch._C.ScriptObject):
            _check_not_script_class(step)
            value = obj.getattr(name)
        else:
            value = getattr(obj, name)

        env[step.outputs[0]] = value

    def set_attr(self, step, env):
        obj, value = (env[uid] for uid in step.inputs)
        if isinstance(obj, _ModuleRef):
            obj.module._c.setattr(step.name, value)
        elif isinstance(obj, torch._C.ScriptObject):
            obj.setattr(step.name, value)
        else:
            setattr(obj, step.name, value)

    def call_method_step(self, step, env):
        target, *args = (env[uid] for uid in step.inputs)
        if isinstance(target, _ModuleRef):
            out = self.call_method(target, step.name, args)
        else:
            out = _method(target, step.name)(*args)

        _store(step, env, out)

    def create_object(self, step, env):
        # Instances of TorchScript classes turn into copies when they reach
        # Python, which would lose their updates; only the grad-mode context
        # managers of ``with torch.no_grad():`` are stateless enough to stand
        # in for with their Python classes
        cls = _CONTEXT_MANAGERS.get(step.value)
        if cls is None:
            raise NotImplementedError(
                f"HookableScriptModule cannot interpret the creation of a {step.value} "
                "(instances of TorchScript classes are not supported)"
            )
        env[step.outputs[0]] = cls.__new__(cls)

    def module_container_index(self, step, env):
        # Indexing a ModuleList or ModuleDict with a value known only at run
        # time (modules typed with an interface)
        container, key = (env[uid] for uid in step.inputs)
        names = list(container.module._modules.keys())
        name = names[key] if isinstance(key, int) else key
        env[step.outputs[0]] = _ModuleRef(
            _join(container.path, name), container.module._modules[name]
        )

    def enter(self, step, env):
        # The TorchScript interpreter keeps a stack of entered objects in
        # its frame, so these two cannot run as separate native calls
        obj = env[step.inputs[0]]
        out = _method(obj, "__enter__")()
        self.entered.append(obj)
        _store(step, env, out)

    def exit(self, step, env):
        # with blocks nest, so the innermost one is the one left
        obj = self.entered.pop()
        _store(step, env, _method(obj, "__exit__")(None, None, None))

    def exit_all(self):
        while self.entered:
            _method(self.entered.pop(), "__exit__")(None, None, None)

    def if_(self, step, env):
        block = step.blocks[0] if env[step.inputs[0]] else step.blocks[1]
        for uid, value in zip(step.outputs, self.run(block, [], env)):
            env[uid] = value

    def loop(self, step, env):
        max_trips, condition, *carried = (env[uid] for uid in step.inputs)
        block = step.blocks[0]
        trip = 0
        while condition and trip < max_trips:
            condition, *carried = self.run(block, [trip] + carried, env)
            trip += 1

        for uid, value in zip(step.outputs, carried):
            env[uid] = value

    def list_construct(self, step, env):
        env[step.outputs[0]] = [env[uid] for uid in step.inputs]

    def tuple_construct(self, step, env):
        env[step.outputs[0]] = tuple(env[uid] for uid in step.inputs)

    def dict_construct(self, step, env):
        items = [env[uid] for uid in step.inputs]
        env[step.outputs[0]] = dict(zip(items[::2], items[1::2]))

    def unpack(self, step, env):
        values = env[step.inputs[0]]
        if len(values) != len(step.outputs):
            raise ValueError(f"Expected {len(step.outputs)} elements to unpack, got {len(values)}")

        for uid, value in zip(step.outputs, values):
            env[uid] = value

    def tuple_index(self, step, env):
        values, index = (env[uid] for uid in step.inputs)
        env[step.outputs[0]] = values[index]

    def identity(self, step, env):
        env[step.outputs[0]] = env[step.inputs[0]]

    def uninitialized(self, step, env):
        env[step.outputs[0]] = None

    def raise_exception(self, step, env):
        message, *cls = (env[uid] for uid in step.inputs)
        cls = cls[0] if cls else None
        # Natively, TorchScript raises torch.jit.Error whatever the class
        raise torch.jit.Error(f"{cls}: {message}" if cls else message)

    def is_(self, step, env):
        a, b = (env[uid] for uid in step.inputs)
        env[step.outputs[0]] = a is b

    def is_not(self, step, env):
        a, b = (env[uid] for uid in step.inputs)
        env[step.outputs[0]] = a is not b

    def getitem(self, step, env):
        # In Python, so that an element that is a list or dict keeps its
        # identity (a native call would copy it)
        container, key = (env[uid] for uid in step.inputs)
        if isinstance(container, (list, tuple, dict, str)):
            env[step.outputs[0]] = container[key]
        else:
            self.native(step, env)

    def len_(self, step, env):
        container = env[step.inputs[0]]
        if isinstance(container, (list, tuple, dict, str)):
            env[step.outputs[0]] = len(container)
        else:
            self.native(step, env)

    def container_op(self, step, env):
        # Native calls get copies of lists and dicts, so ops that mutate them
        # must run in Python to be seen by later nodes
        args = [env[uid] for uid in step.inputs]
        if not args or not isinstance(args[0], (list, dict)):
            return self.native(step, env)

        op = _CONTAINER_OPS.get((step.kind, type(args[0])))
        if op is None:
            raise NotImplementedError(
                f"HookableScriptModule cannot interpret the TorchScript node kind "
                f"'{step.kind}' on a {type(args[0]).__name__}"
            )

        _store(step, env, op(*args))

    def unsupported(self, step, env):
        raise NotImplementedError(
            f"HookableScriptModule cannot interpret the TorchScript node kind '{step.kind}'"
        )

    def native(self, step, env):
        if step.native is None:
            step.native = _NativeNode(step.node)

        args = [env[uid] for uid in step.native.inputs]
        if any(isinstance(a, _ModuleRef) for a in args):
            raise NotImplementedError(
                f"HookableScriptModule cannot interpret the TorchScript node kind "
                f"'{step.kind}' on a module"
            )

        _store(step, env, step.native.function(*args))


def _method(obj, name):
    # Custom C++ classes (torch.classes) stay ScriptObjects in Python
    if isinstance(obj, torch._C.ScriptObject):
        return obj._get_method(name)
    return getattr(obj, name)


def _check_not_script_class(step):
    if step.value is not None and not step.value.startswith("__torch__.torch.classes."):
        raise NotImplementedError(
            f"HookableScriptModule cannot interpret the attribute '{step.name}', a "
            f"{step.value} (instances of TorchScript classes are not supported)"
        )


_CONTEXT_MANAGERS = {
    "__torch__.torch.autograd.grad_mode.no_grad": torch.no_grad,
    "__torch__.torch.autograd.grad_mode.enable_grad": torch.enable_grad,
}


def _store(step, env, out):
    if len(step.outputs) == 1:
        env[step.outputs[0]] = out
    elif step.outputs:
        for uid, value in zip(step.outputs, out):
            env[uid] = value


_HANDLERS = {
    "prim::Constant": _Interpreter.constant,
    "prim::GetAttr": _Interpreter.get_attr,
    "prim::SetAttr": _Interpreter.set_attr,
    "prim::CallMethod": _Interpreter.call_method_step,
    "prim::ModuleContainerIndex": _Interpreter.module_container_index,
    "prim::CreateObject": _Interpreter.create_object,
    "prim::Enter": _Interpreter.enter,
    "prim::Exit": _Interpreter.exit,
    "prim::If": _Interpreter.if_,
    "prim::Loop": _Interpreter.loop,
    "prim::ListConstruct": _Interpreter.list_construct,
    "prim::TupleConstruct": _Interpreter.tuple_construct,
    "prim::DictConstruct": _Interpreter.dict_construct,
    "prim::ListUnpack": _Interpreter.unpack,
    "prim::TupleUnpack": _Interpreter.unpack,
    "prim::TupleIndex": _Interpreter.tuple_index,
    "prim::unchecked_cast": _Interpreter.identity,
    "prim::Uninitialized": _Interpreter.uninitialized,
    "prim::RaiseException": _Interpreter.raise_exception,
    "aten::__is__": _Interpreter.is_,
    "aten::__isnot__": _Interpreter.is_not,
    "aten::__getitem__": _Interpreter.getitem,
    "aten::len": _Interpreter.len_,
}


def _list_pop(values, index=-1):
    return values.pop(index)


def _dict_pop(mapping, key, *default):
    return mapping.pop(key, *default)


def _none(fn):
    # Ops that return nothing in TorchScript
    def op(*args):
        fn(*args)

    return op


def _same(fn):
    # Ops that return their (mutated) first argument
    def op(container, *args):
        fn(container, *args)
        return container

    return op


_CONTAINER_OPS = {
    ("aten::append", list): _same(list.append),
    ("aten::extend", list): _none(list.extend),
    ("aten::insert", list): _none(list.insert),
    ("aten::pop", list): _list_pop,
    ("aten::clear", list): _none(list.clear),
    ("aten::_set_item", list): _same(list.__setitem__),
    ("aten::Delete", list): _none(list.__delitem__),
    ("aten::reverse", list): _none(list.reverse),
    ("aten::remove", list): _none(list.remove),
    ("aten::sort", list): _none(lambda values, reverse=False: values.sort(reverse=reverse)),
    ("aten::_set_item", dict): _none(dict.__setitem__),
    ("aten::Delete", dict): _none(dict.__delitem__),
    ("aten::pop", dict): _dict_pop,
    ("aten::popitem", dict): dict.popitem,
    ("aten::clear", dict): _none(dict.clear),
    ("aten::update", dict): _none(dict.update),
    ("aten::setdefault", dict): dict.setdefault,
}

for _kind, _ in _CONTAINER_OPS:
    _HANDLERS[_kind] = _Interpreter.container_op


class _NativeNode:
    """Runs one graph node natively, as a TorchScript function whose graph
    holds just a copy of that node.

    This gives every operator (aten ops, prim ops such as ``prim::device`` or
    ``prim::NumToTensor``, ``prim::CallFunction`` of TorchScript functions)
    exactly its TorchScript semantics: overload, defaults, scalar types.
    Constant inputs are copied into the small graph rather than passed.
    """

    def __init__(self, node):
        kind = node.kind()
        _check_no_container_mutation(node)
        graph = torch._C.Graph()
        values = {}
        self.inputs = []
        for value in node.inputs():
            uid = value.unique()
            if uid in values:
                continue

            producer = value.node()
            if producer.kind() == "prim::Constant":
                clone = graph.createClone(producer, lambda v: v)
                graph.appendNode(clone)
                values[uid] = clone.output()
            else:
                arg = graph.addInput()
                arg.setType(_plain_type(value.type()))
                values[uid] = arg
                self.inputs.append(uid)

        clone = graph.createClone(node, lambda v: values[v.unique()])
        graph.appendNode(clone)
        for out in clone.outputs():
            graph.registerOutput(out)
        if clone.outputsSize() > 1:
            graph.makeMultiOutputIntoTuple()

        try:
            self.function = torch._C._create_function_from_graph(
                f"hookable_{kind.replace(':', '_')}", graph
            )
        except RuntimeError as e:
            raise NotImplementedError(
                f"HookableScriptModule cannot interpret the TorchScript node kind '{kind}': {e}"
            ) from e


def _check_no_container_mutation(node):
    schema = node.schema()
    if schema == "(no schema)":
        return

    for arg in torch._C.parse_schema(schema).arguments:
        alias = arg.alias_info
        if alias is not None and alias.is_write and "Tensor" not in str(arg.type):
            raise NotImplementedError(
                f"HookableScriptModule cannot interpret the TorchScript node kind "
                f"'{node.kind()}', which modifies its argument '{arg.name}' in place"
            )


def _plain_type(t):
    # Traced graphs carry shapes and strides in their tensor types; the
    # small graphs must accept any tensor
    if isinstance(t, torch._C.TensorType):
        return torch._C.TensorType.get()
    if isinstance(t, torch._C.ListType) and isinstance(t.getElementType(), torch._C.TensorType):
        return torch._C.ListType.ofTensors()
    if isinstance(t, torch._C.OptionalType) and isinstance(t.getElementType(), torch._C.TensorType):
        return torch._C.OptionalType.ofTensor()

    return t
