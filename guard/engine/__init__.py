"""Engines: prefill, step, roll back, expose activations. See :mod:`guard.engine.base`."""

from guard.engine.base import Engine, EngineStats, ModelInfo, Sequence, StepOutput

__all__ = ["Engine", "EngineStats", "ModelInfo", "Sequence", "StepOutput"]
