"""The policy's log section (path, url or url_env) and the service opening its store by URL."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from guard.errors import PolicyError
from guard.logstore import LogStore
from guard.policy import load_policy


def policy_file(tmp_path: Path, log: str, model: str = "./model") -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(f"name: p\nmodel: {{path: {model}}}\nlog: {log}\n")
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_policy(path, check_paths=False)
    return info.value.errors


def test_path_is_the_default_and_resolves_against_the_policy(tmp_path: Path):
    assert load_policy(policy_file(tmp_path, "{record: all}"), check_paths=False).log.target(
        {}
    ) == str(tmp_path.resolve() / "guard.db")
    spec = load_policy(policy_file(tmp_path, "{path: logs/x.db}"), check_paths=False).log
    assert (spec.path, spec.url, spec.url_env) == (tmp_path.resolve() / "logs" / "x.db", None, None)


def test_url_and_url_env(tmp_path: Path):
    spec = load_policy(
        policy_file(tmp_path, "{url: 'postgresql://guard@db:5432/logs'}"), check_paths=False
    ).log
    assert (spec.path, spec.target({})) == (None, "postgresql://guard@db:5432/logs")
    spec = load_policy(policy_file(tmp_path, "{url_env: LOG_URL}"), check_paths=False).log
    assert spec.target({"LOG_URL": " postgres://u:pw@h/d "}) == "postgres://u:pw@h/d"
    with pytest.raises(
        PolicyError, match=re.escape("log.url_env: environment variable LOG_URL: unset or empty")
    ):
        spec.target({})
    with pytest.raises(PolicyError, match="LOG_URL: not a log database URL") as info:
        spec.target({"LOG_URL": "mysql://u:secret@h/d"})
    assert "secret" not in str(info.value)


def test_two_targets_are_an_error_with_file_and_line(tmp_path: Path):
    path = policy_file(tmp_path, "\n  path: x.db\n  url: 'postgresql://u@h/d'")
    assert errors_of(path) == [
        f"{path}:5:8: log.url: set one of path, url and url_env, not path and url"
    ]
    path = policy_file(tmp_path, "{url: 'postgresql://u@h/d', url_env: X}")
    assert errors_of(path) == [
        f"{path}:3:43: log.url_env: set one of path, url and url_env, not url and url_env"
    ]


def test_bad_url_is_an_error(tmp_path: Path):
    path = policy_file(tmp_path, "{url: 'mysql://u@h/d'}")
    [error] = errors_of(path)
    assert (
        error.startswith(f"{path}:3:12: log.url: not a log database URL")
        and "got mysql://" in error
    )


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_service_writes_to_the_store_the_url_names(
    backend: str,
    tiny_model_dir: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
):
    from guard.service import GenerationRequest, GuardService

    url = (
        f"sqlite:///{tmp_path / 'via-url.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("pg_url")()
    )
    monkeypatch.setenv("TEST_GUARD_LOG_URL", url)
    path = policy_file(
        tmp_path, "{url_env: TEST_GUARD_LOG_URL, record: all}", model=str(tiny_model_dir)
    )
    service = GuardService.from_policy_files([path])
    try:
        prepared = service.prepare(
            GenerationRequest(
                model="p",
                request_id="r1",
                max_tokens=3,
                seed=0,
                messages=[{"role": "user", "content": "Hi"}],
            )
        )

        async def generate():
            return [e async for e in service.stream(prepared)][-1]

        finished = asyncio.run(generate())
    finally:
        service.close()
    with LogStore(url) as store:
        assert store.get(finished.log_id).request_id == "r1"
    assert not (tmp_path / "guard.db").exists()
