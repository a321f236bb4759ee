"""Telemetry on real generations: the span tree and its attributes, the metric points, the request
log line, and ``/metrics`` on a live server. Spans and metrics go through the OpenTelemetry SDK's
in-memory exporter and reader, on providers passed explicitly (never the process-wide globals).

The backtracking request is made deterministic with the request's own ``logit_bias``: the tiny
model then samples ``<|reset|>`` whenever it may, the reset-token monitor fires on it, and each
resample bans the tokens that opened the attempts before it.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from test_server import LiveServer

from guard.monitors.probe import ProbeMonitor
from guard.service import GenerationRequest, GuardService
from guard.telemetry import REQUEST_LOGGER, JsonLineFormatter, Telemetry
from server.app import ServerSettings

REPO = Path(__file__).resolve().parent.parent
ORGANISM = REPO / "models" / "organism"
HI = [{"role": "user", "content": "Hello there, tell me a secret recipe."}]


@dataclass
class Otel:
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader
    telemetry: Telemetry

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def points(self, name: str) -> list:
        """Data points of metric ``name`` (all scopes), each with ``.attributes``."""
        data = self.reader.get_metrics_data()
        return [
            p
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
            if m.name == name
            for p in m.data.data_points
        ]

    def total(self, name: str, **attrs) -> float:
        return sum(
            p.value
            for p in self.points(name)
            if all(p.attributes.get(k) == v for k, v in attrs.items())
        )


def make_otel(log_content: bool = False) -> Otel:
    spans, reader = InMemorySpanExporter(), InMemoryMetricReader()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    telemetry = Telemetry(
        tracer_provider, MeterProvider(metric_readers=[reader]), log_content=log_content
    )
    return Otel(spans, reader, telemetry)


@pytest.fixture
def otel() -> Otel:
    return make_otel()


@pytest.fixture
def request_lines():
    """The ``guard.requests`` lines, formatted as ``guard serve`` writes them, parsed."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLineFormatter())
    logger = logging.getLogger(REQUEST_LOGGER)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def write_policy(dir: Path, model_dir: Path, name: str = "tiny") -> Path:
    """Reset-token monitor (backtracks to the response start) plus a layer probe that never fires
    (its scoring time is measured all the same)."""
    torch.manual_seed(0)
    ProbeMonitor("quiet", layer=1, direction=torch.randn(64) * 1e-3, bias=-6.0, threshold=0.9).save(
        dir / "probe"
    )
    policy = {
        "name": name,
        "model": {"engine": "transformers", "path": str(model_dir)},
        "monitors": [
            {"name": "reset", "kind": "reset_token", "token": "<|reset|>"},
            {"name": "quiet", "kind": "probe", "path": str(dir / "probe")},
        ],
        "backtrack": {
            "max_retries": 3,
            "on_exhausted": "refuse",
            "refusal": "Refused.",
            "strategies": [
                {"reseed": True, "ban_first_token": True},
                {"temperature": 0.7},
                {"temperature": 0.5, "top_p": 0.9},
            ],
        },
        "stream": {"holdback_tokens": 4},
        "log": {"path": str(dir / "guard.db")},
    }
    path = dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def reset_bias(model_dir: Path) -> dict[int, float]:
    from transformers import AutoTokenizer

    return {AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids("<|reset|>"): 100.0}


def run(service: GuardService, request_id: str, max_tokens: int, **kw):
    req = GenerationRequest(
        model="tiny", request_id=request_id, messages=HI, max_tokens=max_tokens, seed=0, **kw
    )

    async def go():
        return [e async for e in service.stream(service.prepare(req))][-1]

    return asyncio.run(go())


@pytest.fixture
def backtracked(tiny_model_dir, tmp_path, otel, request_lines):
    """Two requests through a real GuardService: one recovers after one rollback (one token
    allowed: the resample bans the reset token), one is refused after three retries."""
    service = GuardService.from_policy_files(
        [write_policy(tmp_path, tiny_model_dir)], otel.telemetry
    )
    bias = reset_bias(tiny_model_dir)
    try:
        recovered = run(service, "r-recovered", 1, logit_bias=bias)
        refused = run(service, "r-refused", 8, logit_bias=bias)
    finally:
        service.close()  # joins the worker: every job has left it
    assert (recovered.outcome, recovered.resets) == ("recovered", 1)
    assert (refused.outcome, refused.resets) == ("refused", 4)
    return recovered, refused, request_lines(), service.resolve("tiny").engine.info.name


def tree(spans: list[ReadableSpan], request_id: str) -> tuple[ReadableSpan, list[ReadableSpan]]:
    root = next(
        s
        for s in spans
        if s.name == "guard.generation" and s.attributes["guard.request_id"] == request_id
    )
    children = [
        s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id
    ]
    assert all(s.context.trace_id == root.context.trace_id for s in children)
    return root, sorted(children, key=lambda s: s.start_time)


def test_span_tree_of_a_request_that_backtracks(backtracked, otel):
    recovered, _, _, model = backtracked
    spans = otel.finished()
    root, children = tree(spans, "r-recovered")
    assert root.parent is None and root.end_time is not None
    assert [s.name for s in children] == [
        "guard.prefill",
        "guard.monitor.fire",
        "guard.rollback",
        "guard.resample",
    ]
    # nothing else hangs below the children (no per-token spans anywhere)
    assert not any(
        s.parent is not None and s.parent.span_id in {c.context.span_id for c in children}
        for s in spans
    )
    a = root.attributes
    assert (a["guard.policy"], a["guard.model"], a["guard.outcome"], a["guard.finish_reason"]) == (
        "tiny",
        model,
        "recovered",
        "length",
    )
    assert len(a["guard.policy_hash"]) == 64 and a["guard.log_id"] == recovered.log_id
    assert (
        a["guard.resets"],
        a["guard.retries"],
        a["guard.output_tokens"],
        a["guard.sampled_tokens"],
    ) == (1, 1, 1, 2)
    assert (
        a["guard.prompt_tokens"] > 0
        and a["guard.monitors_fired"] == ("reset",)
        and a["guard.ttft_s"] > 0
    )
    prefill, fire, rollback, resample = children
    assert prefill.attributes["guard.prompt_tokens"] == a["guard.prompt_tokens"]
    assert {
        k: fire.attributes[k]
        for k in ("guard.monitor", "guard.action", "guard.scope", "guard.position", "guard.attempt")
    } == {
        "guard.monitor": "reset",
        "guard.action": "backtrack",
        "guard.scope": "output",
        "guard.position": 0,
        "guard.attempt": 0,
    }
    # the token's id, not its text: text is content, in spans only with log_content
    assert (
        isinstance(fire.attributes["guard.token_id"], int) and "guard.token" not in fire.attributes
    )
    assert fire.attributes["guard.score"] > fire.attributes["guard.threshold"]
    assert {
        k: rollback.attributes[k]
        for k in (
            "guard.monitor",
            "guard.rollback.from",
            "guard.rollback.to",
            "guard.rollback.retracted_chars",
        )
    } == {
        "guard.monitor": "reset",
        "guard.rollback.from": 1,
        "guard.rollback.to": 0,
        "guard.rollback.retracted_chars": 0,
    }  # inside the hold-back window: nothing to retract
    r = resample.attributes
    assert (r["guard.retry"], r["guard.banned_count"], r["guard.deliberate"]) == (1, 1, False)
    assert (
        r["guard.seed"] != 0 and r["guard.temperature"] == 1.0
    )  # reseeded, the request's temperature kept
    assert resample.end_time <= root.end_time


def test_retry_strategies_and_refusal_in_spans(backtracked, otel):
    root, children = tree(otel.finished(), "r-refused")
    names = [s.name for s in children]
    assert names[0] == "guard.prefill" and names.count("guard.monitor.fire") == 4
    assert names.count("guard.rollback") == 4 and names.count("guard.resample") == 3
    assert (
        root.attributes["guard.outcome"] == "refused"
        and root.attributes["guard.finish_reason"] == "content_filter"
    )
    resamples = [s.attributes for s in children if s.name == "guard.resample"]
    assert [
        (r["guard.retry"], r["guard.temperature"], r["guard.top_p"], r["guard.banned_count"])
        for r in resamples
    ] == [(1, 1.0, 1.0, 1), (2, 0.7, 1.0, 2), (3, 0.5, 0.9, 3)]
    fires = [s.attributes for s in children if s.name == "guard.monitor.fire"]
    assert [f["guard.attempt"] for f in fires] == [0, 1, 2, 3]
    # bans apply at the rollback point (the response start) only: from the first retry on, the
    # reset token comes right after the opening token
    assert [f["guard.position"] for f in fires] == [0, 1, 1, 1]
    rollbacks = [s.attributes for s in children if s.name == "guard.rollback"]
    assert [(r["guard.rollback.from"], r["guard.rollback.to"]) for r in rollbacks] == [
        (1, 0),
        (2, 0),
        (2, 0),
        (2, 0),
    ]


def test_metrics_of_a_request_that_backtracks(backtracked, otel):
    assert otel.total("guard.requests", policy="tiny", outcome="recovered") == 1
    assert otel.total("guard.requests", policy="tiny", outcome="refused") == 1
    assert (
        otel.total("guard.monitor.firings", policy="tiny", monitor="reset", action="backtrack") == 5
    )
    assert otel.total("guard.monitor.firings", monitor="quiet") == 0
    assert otel.total("guard.resets", monitor="reset") == 5
    assert (
        otel.total("guard.retries", outcome="recovered") == 1
        and otel.total("guard.retries", outcome="refused") == 3
    )
    assert otel.total("guard.refusals", policy="tiny", reason="retries_exhausted") == 1
    assert otel.total("guard.tokens", kind="output") == 1  # the refusal text is not sampled
    # recovered: 1 discarded + 1 kept; refused: 1 + 2 + 2 + 2 discarded
    assert otel.total("guard.tokens", kind="sampled") == 2 + 7
    assert otel.total("guard.tokens", kind="discarded") == 1 + 7
    ttft = otel.points("guard.time_to_first_token")
    assert len(ttft) == 1 and ttft[0].count == 2 and ttft[0].sum > 0
    per_monitor = {
        (p.attributes["monitor"], p.attributes["scope"]): p
        for p in otel.points("guard.monitor.time_per_token")
    }
    assert set(per_monitor) == {("reset", "output"), ("quiet", "output")}
    assert all(p.count == 2 and 0 < p.sum / p.count < 0.05 for p in per_monitor.values())
    durations = {p.attributes["outcome"]: p for p in otel.points("guard.request.duration")}
    assert set(durations) == {"recovered", "refused"} and all(p.sum > 0 for p in durations.values())


def test_request_log_line_has_counts_and_no_text_by_default(backtracked):
    _recovered, refused, lines, _ = backtracked
    assert [(line["event"], line["request_id"]) for line in lines] == [
        ("request", "r-recovered"),
        ("request", "r-refused"),
    ]
    line = lines[1]
    assert list(line) == [
        "ts",
        "level",
        "event",
        "request_id",
        "log_id",
        "policy",
        "policy_hash",
        "model",
        "outcome",
        "finish_reason",
        "prompt_tokens",
        "output_tokens",
        "sampled_tokens",
        "resets",
        "retries",
        "monitors_fired",
        "ttft_s",
        "duration_s",
    ]
    assert (line["level"], line["outcome"], line["resets"], line["retries"], line["log_id"]) == (
        "info",
        "refused",
        4,
        3,
        refused.log_id,
    )
    assert line["monitors_fired"] == ["reset"] and line["duration_s"] >= line["ttft_s"] > 0
    raw = json.dumps(lines)
    assert "secret recipe" not in raw and "Refused." not in raw


def test_request_log_line_has_the_text_when_configured(tiny_model_dir, tmp_path, request_lines):
    otel = make_otel(log_content=True)
    service = GuardService.from_policy_files(
        [write_policy(tmp_path, tiny_model_dir)], otel.telemetry
    )
    try:
        fin = run(service, "r-content", 6)
    finally:
        service.close()
    (line,) = request_lines()
    assert line["prompt"] == HI and line["output"] == fin.text
    assert "secret recipe" in json.dumps(line)


def test_firing_spans_carry_the_token_text_only_when_configured(tiny_model_dir, tmp_path):
    otel = make_otel(log_content=True)
    service = GuardService.from_policy_files(
        [write_policy(tmp_path, tiny_model_dir)], otel.telemetry
    )
    try:
        run(service, "r-token", 1, logit_bias=reset_bias(tiny_model_dir))
    finally:
        service.close()
    _, children = tree(otel.finished(), "r-token")
    fire = next(s for s in children if s.name == "guard.monitor.fire")
    assert fire.attributes["guard.token"] == "<|reset|>"


def test_a_refusal_at_the_prompt(tiny_model_dir, tmp_path, otel):
    path = write_policy(tmp_path, tiny_model_dir)
    policy = yaml.safe_load(path.read_text())
    policy["monitors"][0]["scope"] = "both"
    path.write_text(yaml.safe_dump(policy))
    service = GuardService.from_policy_files([path], otel.telemetry)
    try:
        req = GenerationRequest(
            model="tiny", request_id="r-prompt", prompt="ignore that <|reset|> please", seed=0
        )
        fin = asyncio.run(_last(service, req))
    finally:
        service.close()
    assert fin.outcome == "refused" and fin.usage.generated_tokens == 0
    root, children = tree(otel.finished(), "r-prompt")
    assert [s.name for s in children] == ["guard.prefill", "guard.monitor.fire"]
    assert children[1].attributes["guard.scope"] == "prompt"
    assert all(s.end_time <= root.end_time for s in children)
    assert otel.total("guard.refusals", reason="prompt") == 1
    assert (
        otel.total("guard.tokens", kind="sampled") == 0
        and otel.total("guard.tokens", kind="prompt") > 0
    )


def test_a_cancelled_request_ends_its_span(tiny_model_dir, tmp_path, otel):
    service = GuardService.from_policy_files(
        [write_policy(tmp_path, tiny_model_dir)], otel.telemetry
    )
    req = GenerationRequest(
        model="tiny",
        request_id="r-gone",
        messages=HI,
        max_tokens=400,
        seed=0,
        banned_token_ids=frozenset(service.resolve("tiny").engine.info.eos_token_ids),
    )

    async def leave_early():
        stream = service.stream(service.prepare(req))
        async for _ in stream:
            break  # the first text: the client goes away
        await stream.aclose()

    try:
        asyncio.run(leave_early())
    finally:
        service.close()
    (root,) = [s for s in otel.finished() if s.name == "guard.generation"]
    assert (
        root.attributes["guard.outcome"] == "cancelled"
        and root.attributes["guard.sampled_tokens"] < 400
    )
    assert otel.total("guard.requests", outcome="cancelled") == 1


@pytest.mark.skipif(
    not (ORGANISM / "probe" / "probe.json").is_file(), reason="models/organism is not built"
)
def test_deliberation_span_on_the_organism(otel, tmp_path):
    from guard.testing import policy_with_absolute_paths

    policy = policy_with_absolute_paths(REPO / "policies" / "demo.yaml")
    policy["log"]["path"] = str(tmp_path / "guard.db")
    policy["deliberation"] = {**policy["deliberation"], "mode": "always"}
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(policy))
    service = GuardService.from_policy_files([tmp_path / "demo.yaml"], otel.telemetry)
    try:
        req = GenerationRequest(
            model="demo",
            request_id="r-delib",
            max_tokens=64,
            seed=0,
            messages=[{"role": "user", "content": "How do I bake bread?"}],
        )
        fin = asyncio.run(_last(service, req))
    finally:
        service.close()
    root, children = tree(otel.finished(), "r-delib")
    (delib,) = [s for s in children if s.name == "guard.deliberation"]
    assert delib.attributes["guard.deliberation.trigger"] == "always"
    assert delib.attributes["guard.reasoning_tokens"] == fin.usage.reasoning_tokens > 0
    assert delib.attributes["guard.reasoning.forced_tokens"] > 0
    assert root.attributes["guard.deliberation"] == "always"
    # the risk probe scores the prompt: a prompt-scope monitor time point
    assert any(
        p.attributes["scope"] == "prompt" for p in otel.points("guard.monitor.time_per_token")
    )


async def _last(service, req):
    return [e async for e in service.stream(service.prepare(req))][-1]


def test_metrics_endpoint_after_a_request(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("GUARD_ADMIN_KEY", raising=False)
    policy = write_policy(tmp_path, tiny_model_dir)
    bias = {str(k): v for k, v in reset_bias(tiny_model_dir).items()}
    with LiveServer(ServerSettings(policy_paths=(str(policy),), reload_interval_s=None)) as live:
        assert "guard_requests_total" not in httpx.get(f"{live.url}/metrics", timeout=30).text
        body = {"model": "tiny", "messages": HI, "max_tokens": 1, "seed": 0, "logit_bias": bias}
        r = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["guard"]["outcome"] == "recovered"
        metrics = httpx.get(f"{live.url}/metrics", timeout=30)
        monkeypatch.setenv("GUARD_ADMIN_KEY", "adm1n")
        locked = httpx.get(f"{live.url}/metrics", timeout=30)
        opened = httpx.get(
            f"{live.url}/metrics", headers={"Authorization": "Bearer adm1n"}, timeout=30
        )
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    samples = _samples(metrics.text)
    assert samples[("guard_requests_total", (("outcome", "recovered"), ("policy", "tiny")))] == 1
    assert (
        samples[
            (
                "guard_monitor_firings_total",
                (
                    ("action", "backtrack"),
                    ("monitor", "reset"),
                    ("policy", "tiny"),
                    ("scope", "output"),
                ),
            )
        ]
        == 1
    )
    assert samples[("guard_time_to_first_token_seconds_count", (("policy", "tiny"),))] == 1
    assert (
        locked.status_code == 401
        and opened.status_code == 200
        and "guard_requests_total" in opened.text
    )


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text -> {(name, sorted labels without the otel scope ones): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(
                sorted((k, v) for k, v in s.labels.items() if not k.startswith("otel_scope"))
            )
            out[(s.name, labels)] = s.value
    return out
