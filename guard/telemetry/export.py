"""The SDK side of telemetry, for the server: Prometheus ``/metrics`` and optional OTLP export.

This module imports the OpenTelemetry SDK and the Prometheus exporter (server dependencies); the
library itself needs only the API (:mod:`guard.telemetry.generation`). OTLP export is optional:
it needs ``opentelemetry-exporter-otlp`` (``pip install 'guard[otel]'``) and the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT`` / ``..._METRICS_ENDPOINT``); the
protocol follows ``OTEL_EXPORTER_OTLP_PROTOCOL`` (``http/protobuf`` by default, or ``grpc``).
Without them nothing is exported and traces stay the API's no-op ones.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

from opentelemetry import trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


def resource(env: Mapping[str, str] = os.environ) -> Resource:
    """``service.name`` = ``$OTEL_SERVICE_NAME`` or ``guard`` (plus ``$OTEL_RESOURCE_ATTRIBUTES``)."""
    return Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or "guard"})


class PrometheusMetrics:
    """An SDK :class:`MeterProvider` whose reader renders the Prometheus text ``/metrics`` serves.

    It has its own Prometheus registry and is not installed as the global provider, so that
    several apps in one process (tests) never see each other's metrics; the server hands
    :attr:`provider` to its :class:`~guard.telemetry.Telemetry`. ``readers`` are added beside the
    Prometheus one (an OTLP reader, see :func:`otlp_metric_readers`).
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, readers: Sequence[MetricReader] = ()) -> None:
        self.registry = CollectorRegistry()
        self.reader = PrometheusMetricReader(
            disable_target_info=True, scope_info_enabled=False, registry=self.registry
        )
        self.provider = MeterProvider(metric_readers=[self.reader, *readers], resource=resource())

    def render(self) -> bytes:
        """The current metrics in the Prometheus text exposition format."""
        return generate_latest(self.registry)

    def shutdown(self) -> None:
        self.provider.shutdown()


def _otlp_protocol(env: Mapping[str, str], signal: str) -> str:
    return (
        env.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )


def _otlp_endpoint(env: Mapping[str, str], signal: str) -> str | None:
    return (
        env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or None
    )


def configure_otlp_tracing(env: Mapping[str, str] = os.environ) -> str | None:
    """Install a global SDK tracer provider exporting to OTLP in batches, if an endpoint is set and
    the exporter is installed; return ``"protocol -> endpoint"``, or ``None`` (traces stay no-op).

    The global tracer provider can be set once per process: call this once, at startup.
    """
    endpoint = _otlp_endpoint(env, "TRACES")
    if endpoint is None:
        return None
    protocol = _otlp_protocol(env, "TRACES")
    try:
        exporter: type[SpanExporter]
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as exporter,
            )
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as exporter,
            )
    except ImportError:
        log.warning(
            "an OTLP endpoint is set but opentelemetry-exporter-otlp is not installed "
            "(pip install 'guard[otel]'): traces are not exported"
        )
        return None
    provider = TracerProvider(resource=resource(env))
    provider.add_span_processor(BatchSpanProcessor(exporter()))
    trace.set_tracer_provider(provider)
    return f"{protocol} -> {endpoint}"


def otlp_metric_readers(env: Mapping[str, str] = os.environ) -> list[MetricReader]:
    """A periodic OTLP metric reader if an endpoint is set and the exporter is installed; else ``[]``."""
    if _otlp_endpoint(env, "METRICS") is None:
        return []
    try:
        metric_exporter: type[MetricExporter]
        if _otlp_protocol(env, "METRICS") == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter as metric_exporter,
            )
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter as metric_exporter,
            )
    except ImportError:
        log.warning(
            "an OTLP endpoint is set but opentelemetry-exporter-otlp is not installed "
            "(pip install 'guard[otel]'): metrics are only served on /metrics"
        )
        return []
    return [PeriodicExportingMetricReader(metric_exporter())]
