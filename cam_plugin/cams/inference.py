"""How the gradient-free forward passes that perturbation methods run by the
thousand (Score-CAM runs one per channel and image) are made fast: a copy of
the model with batch norms folded into their convolutions and, on CPU, the
channels-last memory format that oneDNN's convolutions prefer; and on CPU,
a few streams of chunks side by side, the threads shared among them, instead
of one stream on all threads, because small convolutions scale poorly
across threads.

All of it is exact up to float rounding. The user's model is never modified.
"""

import contextlib
import copy
import itertools
import logging
import operator
from concurrent.futures import ThreadPoolExecutor

import torch

logger = logging.getLogger(__name__)

_BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
_FRESH_OUTPUT_MODULES = (torch.nn.modules.conv._ConvNd, torch.nn.Linear) + _BATCH_NORMS


def inference_copy(model, device):
    """Returns a copy of ``model`` (in eval mode) optimised for inference
    on ``device``, or ``model`` itself when no optimisation applies.

    Args:
        model: a ``torch.nn.Module`` in eval mode
        device: the ``torch.device`` the passes run on

    Returns:
        a ``(module, memory_format)`` tuple: the module to run and the
        memory format its inputs should have
    """
    if isinstance(model, torch.jit.ScriptModule) or model.training:
        return model, torch.contiguous_format

    modules = list(model.modules())
    has_batch_norm = any(isinstance(m, _BATCH_NORMS) for m in modules)
    has_conv = any(isinstance(m, torch.nn.Conv2d) for m in modules)
    channels_last = has_conv and device.type == "cpu"
    if not (has_batch_norm or channels_last):
        return model, torch.contiguous_format

    fast = None
    if has_batch_norm:
        from torch.fx.experimental.optimization import fuse

        try:
            fast = fuse(model, inplace=False)
        except Exception as e:  # noqa: BLE001
            # torch.fx cannot trace every model (data-dependent control flow,
            # unusual outputs); the unfused model gives the same results
            logger.debug("Batch norms not folded, the model does not trace: %s", e)

    if fast is not None:
        _relu_in_place(fast)
    else:
        if not channels_last:
            return model, torch.contiguous_format
        try:
            fast = copy.deepcopy(model)
        except Exception as e:  # noqa: BLE001
            logger.debug("Model not copied for channels-last: %s", e)
            return model, torch.contiguous_format

    fast.eval()
    if channels_last:
        fast.to(memory_format=torch.channels_last)
        return fast, torch.channels_last

    return fast, torch.contiguous_format


class InferenceModels:
    """The inference copy of one model, built on first use and rebuilt only
    when the model's weights change (a new or modified parameter or buffer),
    so that a run builds it once rather than once per batch."""

    def __init__(self, model):
        self.model = model
        self._key = None
        self._value = None

    def get(self, device):
        """Returns ``inference_copy(model, device)``, from the cache when the
        weights are unchanged."""
        tensors = itertools.chain(self.model.parameters(), self.model.buffers())
        key = (device, tuple((id(t), t._version, t.device) for t in tensors))
        if key != self._key:
            self._value = inference_copy(self.model, device)
            self._key = key

        return self._value


def _relu_in_place(graph_module):
    """Makes the ReLUs of a traced copy work in place where their input is a
    fresh tensor that nothing else reads (a convolution's, a batch norm's,
    a linear layer's or a sum's output, never a view), which saves an
    allocation and a pass over memory per activation."""
    modules = dict(graph_module.named_modules())
    calls = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    for node in graph_module.graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        if not isinstance(modules[node.target], (torch.nn.ReLU, torch.nn.ReLU6)):
            continue
        source = node.args[0] if node.args else None
        if isinstance(source, torch.fx.Node) and len(source.users) == 1 and _is_fresh(source, modules):
            modules[node.target].inplace = True


def _is_fresh(node, modules):
    if node.op == "call_module":
        return isinstance(modules[node.target], _FRESH_OUTPUT_MODULES)
    return node.op == "call_function" and node.target in (operator.add, torch.add)


#: at most this many streams: each holds a chunk of inputs and activations
MAX_STREAMS = 4


@contextlib.contextmanager
def parallel_streams(device, num_chunks):
    """Yields a thread pool that runs chunks side by side, the CPU's threads
    shared among them, or None where that does not apply (CUDA, a single
    thread, a single chunk).

    torch's thread count is process-wide, so it is lowered for the duration
    and always restored.
    """
    threads = torch.get_num_threads()
    streams = min(threads, num_chunks, MAX_STREAMS)
    if device.type != "cpu" or streams < 2:
        yield None
        return

    torch.set_num_threads(threads // streams)
    try:
        with ThreadPoolExecutor(streams, thread_name_prefix="cam-stream") as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)
