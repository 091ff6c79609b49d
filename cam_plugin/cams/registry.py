"""The registry of CAM methods: what a method is, and how a name finds one.

Method modules register into it and never import each other:
:mod:`.methods` adds the built-in methods by name, :mod:`.external` adds a
resolver for the ``"pgc:<ClassName>"`` names of the optional grad-cam
package. Both are imported by :mod:`cam_plugin.cams`, so the registry is
complete whenever the package is.
"""

from dataclasses import dataclass

from .capture import CamError


@dataclass(frozen=True)
class MethodSpec:
    """A CAM method.

    Attributes:
        name: the name users select it by
        fn: ``fn(ctx, classes)`` from a :class:`CamContext` and a (B, T)
            tensor of class indices to (B, T, h, w) maps
        needs_gradients: whether the forward pass must record gradients
        description: one line for the App's method dropdown
        full_resolution: whether the maps are at the input size rather than
            the layer grid
    """

    name: str
    fn: callable
    needs_gradients: bool
    description: str
    full_resolution: bool = False


#: method name -> :class:`MethodSpec`, in the order they were registered
METHODS = {}

# name prefix (``"pgc:"``) -> resolver from the rest of the name to a MethodSpec
_PREFIXES = {}


def register(spec):
    """Adds a method under its (lower-case) name and returns it."""
    key = spec.name.lower()
    if key in METHODS and METHODS[key] is not spec:
        raise ValueError(f"A CAM method named '{spec.name}' is already registered")

    METHODS[key] = spec
    return spec


def register_prefix(prefix, resolver):
    """Makes names ``"<prefix><rest>"`` resolve to ``resolver(rest)``, for
    families of methods that are only known when asked for (the classes of
    an optional package). ``rest`` keeps the case the user typed."""
    _PREFIXES[prefix.lower()] = resolver


def get_method(name):
    """Returns the :class:`MethodSpec` of a method name.

    Names of the ``grad-cam`` package's classes (for example
    ``"pgc:EigenGradCAM"``) select that package's implementation when it is
    installed.
    """
    if isinstance(name, MethodSpec):
        return name

    text = str(name).strip()
    key = text.lower()
    if key in METHODS:
        return METHODS[key]

    for prefix, resolver in _PREFIXES.items():
        if key.startswith(prefix):
            return resolver(text[len(prefix) :])

    raise CamError(
        f"Unknown CAM method '{name}'. Available: {', '.join(METHODS)}, or "
        "'pgc:<ClassName>' for a method of the installed grad-cam package"
    )
