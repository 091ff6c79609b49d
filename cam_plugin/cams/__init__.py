"""CAM math: torch only, no FiftyOne. Hooks, layer discovery, methods."""

from .capture import CamError, SpatialLayout, logits_of
from .extractor import CamContext, CamExtractor, CamResult
from .layers import LayerCandidate, check_layer, default_layer, probe_layers
from .methods import METHODS, MethodSpec, get_method
