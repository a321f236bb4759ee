"""guard: inference-time safety middleware for LLM serving.

The library is organised around small seams:

- ``guard.engine``: an :class:`~guard.engine.base.Engine` prefills, steps, rolls back and exposes
  activations; :mod:`guard.engine.transformers_engine` is the embedded implementation.
- ``guard.monitors``: a monitor turns activations (or sampled token ids) into per-token scores.
- ``guard.controller``: the backtracking controller, whose state is explicit data.
- ``guard.policy``: the typed YAML policy.
- ``guard.logstore``: the durable flagged-generation log.
"""

__version__ = "0.1.0"
