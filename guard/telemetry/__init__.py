"""Observability: OpenTelemetry traces and metrics, and one structured log line per request.

The library uses the OpenTelemetry *API* only (:mod:`guard.telemetry.generation`): without an
SDK configured, tracers and meters are the API's no-op ones and a request costs a handful of
no-op calls, none per token. The SDK side (a Prometheus ``/metrics`` reader, OTLP export) lives
in :mod:`guard.telemetry.export` and is imported by the server only.

- :class:`Telemetry` is what the service holds (providers passed explicitly, or the globals);
  :meth:`Telemetry.generation` starts a :class:`GenerationTrace` per request.
- :data:`NO_TRACE` is the do-nothing trace the controller uses when it is given none.
- :mod:`guard.telemetry.request_log`: the ``guard.requests`` logger and its JSON-lines format.
"""

from guard.controller.trace import NO_TRACE, GenerationTrace
from guard.telemetry.generation import Telemetry
from guard.telemetry.request_log import REQUEST_LOGGER, JsonLineFormatter, install_request_log

__all__ = [
    "NO_TRACE",
    "REQUEST_LOGGER",
    "GenerationTrace",
    "JsonLineFormatter",
    "Telemetry",
    "install_request_log",
]
