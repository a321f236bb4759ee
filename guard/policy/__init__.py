"""Policy files: the schema (:mod:`guard.policy.schema`) and the loader (:mod:`guard.policy.loader`)."""

from guard.policy.loader import format_policy, load_policy
from guard.policy.schema import (
    AccessSpec,
    AggregationConfig,
    BacktrackSpec,
    LogSpec,
    ModelSpec,
    MonitorSpec,
    Policy,
    ProbeMonitorSpec,
    RequestDefaults,
    ResampleStrategy,
    ResetTokenMonitorSpec,
    StreamSpec,
)

__all__ = [
    "AccessSpec",
    "AggregationConfig",
    "BacktrackSpec",
    "LogSpec",
    "ModelSpec",
    "MonitorSpec",
    "Policy",
    "ProbeMonitorSpec",
    "RequestDefaults",
    "ResampleStrategy",
    "ResetTokenMonitorSpec",
    "StreamSpec",
    "format_policy",
    "load_policy",
]
