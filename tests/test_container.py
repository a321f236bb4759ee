"""The CPU image (deploy/Containerfile), built by deploy/image.sh and run with podman, for real.

Runs only with GUARD_TEST_CONTAINER=1 (.ci/run sets it and installs podman, runc and mmdebstrap):
building takes minutes the first time (a Debian base from Debian's packages, a wheelhouse, the
image); later builds reuse podman's layer cache. The container runs the way the Kubernetes base
does: read-only root file system, non-root, the cluster's policy mounted read-only, the log on a
volume; it answers a chat completion through the official openai client, reports healthy through
its HEALTHCHECK, and exits 0 on SIGTERM after draining.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from guard.testing import free_port

REPO = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("GUARD_IMAGE", "localhost/guard:cpu")
NAME = f"guard-test-{os.getpid()}"

pytestmark = pytest.mark.skipif(
    os.environ.get("GUARD_TEST_CONTAINER") != "1",
    reason="container tests run with GUARD_TEST_CONTAINER=1 (see .ci/run)",
)


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {done.stderr or done.stdout}")
    return done


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed (apt-get install podman runc mmdebstrap)")
    build = subprocess.run(
        ["bash", str(REPO / "deploy" / "image.sh"), "build"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "GUARD_IMAGE": IMAGE},
        check=False,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return IMAGE


def run_options() -> list[str]:
    out = subprocess.run(
        ["bash", str(REPO / "deploy" / "image.sh"), "run-opts"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def wait_ready(name: str, url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        state = podman("inspect", name, "--format", "{{.State.Status}}").stdout.strip()
        assert state == "running" and time.monotonic() < deadline, podman(
            "logs", name, check=False
        ).stderr
        time.sleep(1)


def test_the_image_serves_the_demo_out_of_the_box(image):
    port, name = free_port(), f"{NAME}-demo"
    podman("run", "-d", "--name", name, *run_options(), "-p", f"127.0.0.1:{port}:8000", image)
    try:
        wait_ready(name, f"http://127.0.0.1:{port}")
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == ["demo"]
    finally:
        podman("rm", "-f", "-t", "30", name, check=False)


def test_the_image_serves_the_cluster_policy_read_only_and_drains_on_sigterm(image, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, 10001, 10001)  # the image's fixed non-root uid, as Kubernetes' fsGroup would
    port = free_port()
    podman(
        "run",
        "-d",
        "--name",
        NAME,
        *run_options(),
        "--read-only",
        "--tmpfs",
        "/tmp",
        "-v",
        f"{REPO / 'deploy/k8s/base/policies'}:/srv/guard/policies:ro",
        "-v",
        f"{data}:/var/lib/guard",
        "-p",
        f"127.0.0.1:{port}:8000",
        image,
        "--policy",
        "/srv/guard/policies/guard.yaml",
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(NAME, url)
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "How do I bake bread?"}],
            seed=1,
            max_tokens=48,
        )
        assert (
            r.choices[0].message.content and r.choices[0].model_extra["guard"]["outcome"] == "clean"
        )
        assert podman("exec", NAME, "id", "-u").stdout.strip() == "10001"
        assert podman("healthcheck", "run", NAME, check=False).returncode == 0
        assert "/ready" in " ".join(
            json.loads(podman("image", "inspect", image).stdout)[0]["Healthcheck"]["Test"]
        )
        write = podman("exec", NAME, "touch", "/srv/guard/policies/x", check=False)
        assert write.returncode != 0 and "Read-only" in write.stderr

        podman("stop", "-t", "60", NAME, timeout=90)
        assert podman("inspect", NAME, "--format", "{{.State.ExitCode}}").stdout.strip() == "0"
        logs = podman("logs", NAME).stderr
        assert "drained: shutting down" in logs and "Finished server process" in logs
    finally:
        podman("rm", "-f", NAME, check=False)
    with sqlite3.connect(data / "guard.db") as db:  # GUARD_LOG_URL: the log is on the volume
        assert db.execute("SELECT count(*) FROM _migrations").fetchone()[0] > 0
