"""The guard service, split by job (see :mod:`guard.service.facade` for the parts)."""

from guard.service.facade import GuardService
from guard.service.prepare import GenerationRequest, PreparedGeneration
from guard.service.registry import ServedModel

__all__ = ["GenerationRequest", "GuardService", "PreparedGeneration", "ServedModel"]
