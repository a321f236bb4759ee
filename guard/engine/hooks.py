"""Forward hooks on decoder layers, only through a context manager that always removes them.

HF decoder layers return either a tensor or a tuple whose first element is the hidden state
(the residual stream after the block); :func:`_hidden_of` unpacks both.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from guard.errors import ModelLoadError

_LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "layers",
)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM: HF models (Llama/Mistral/Qwen/Gemma, GPT-2,
    GPT-NeoX) and vLLM's implementations of them."""
    for path in _LAYER_PATHS:
        obj: object = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ModelLoadError(f"cannot find the decoder layers of {type(model).__name__}")


def _hidden_of(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, hidden):
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


@contextmanager
def capture_layers(
    modules: Sequence[nn.Module] | nn.ModuleList,
    capture: Collection[int],
    steer: Mapping[int, torch.Tensor] | None = None,
) -> Iterator[dict[int, torch.Tensor]]:
    """Capture the output of ``modules[i]`` for each ``i`` in ``capture`` (i -> ``[batch, seq, d]``,
    float32 clone).

    If ``steer`` maps a layer to a vector, that vector is added to the layer's output on its way to
    the next layer; what is captured at that layer is the activation *before* steering. The hooks
    are removed when the block exits, whatever happens inside.
    """
    captured: dict[int, torch.Tensor] = {}
    steer = steer or {}
    handles = []

    def make_hook(idx: int):
        def hook(_module, _inputs, output):
            hidden = _hidden_of(output)
            if idx in capture:
                # Captured before steering: monitors read the model's own state at this layer, so a
                # steered resample cannot blind the monitor that reads the steered layer. (Clone:
                # fused kernels in some models mutate the tensor after the hook returns.)
                captured[idx] = hidden.detach().float().clone()
            vec = steer.get(idx)
            if vec is None:
                return None
            return _replace_hidden(output, hidden + vec.to(hidden.dtype))

        return hook

    try:
        for idx in sorted(set(capture) | set(steer)):
            handles.append(modules[idx].register_forward_hook(make_hook(idx)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
