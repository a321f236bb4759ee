"""Forward hooks on decoder layers, only through a context manager that always removes them.

HF decoder layers return either a tensor or a tuple whose first element is the hidden state
(the residual stream after the block); :func:`_hidden_of` unpacks both.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn


def _hidden_of(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, hidden):
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


@contextmanager
def capture_layers(modules: Sequence[nn.Module], capture: Collection[int],
                   steer: Mapping[int, torch.Tensor] | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """Capture the output of ``modules[i]`` for each ``i`` in ``capture`` (i -> ``[batch, seq, d]``,
    float32 clone).

    If ``steer`` maps a layer to a vector, that vector is added to the layer's output before it is
    captured and passed on. The hooks are removed when the block exits, whatever happens inside.
    """
    captured: dict[int, torch.Tensor] = {}
    steer = steer or {}
    handles = []

    def make_hook(idx: int):
        def hook(_module, _inputs, output):
            hidden = _hidden_of(output)
            vec = steer.get(idx)
            if vec is not None:
                hidden = hidden + vec.to(hidden.dtype)
                output = _replace_hidden(output, hidden)
            # clone: fused kernels in some models mutate the tensor after the hook returns
            if idx in capture:
                captured[idx] = hidden.detach().float().clone()
            return output if vec is not None else None
        return hook

    try:
        for idx in sorted(set(capture) | set(steer)):
            handles.append(modules[idx].register_forward_hook(make_hook(idx)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
