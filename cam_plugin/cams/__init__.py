"""CAM math: torch only, no FiftyOne. Hooks, layer discovery, methods."""

from .capture import CamError, SpatialLayout, layer_hooks, logits_of
from .extractor import CamContext, CamExtractor, CamResult
from .layers import LayerCandidate, check_layer, default_layer, probe_layers
from .registry import METHODS, MethodSpec, get_method

# Imported for their registrations: the built-in methods and the "pgc:" names
from . import external, methods  # noqa: F401
