"""API keys bound to policies (per-tenant policies) through the real app, service and tiny model."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from guard.errors import PolicyError
from server.app import ServerSettings, create_app

HI = [{"role": "user", "content": "Hello there"}]


def write_policy(dir: Path, model_dir: Path, name: str, access: str = "") -> Path:
    path = dir / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nmodel: {{path: {model_dir}}}\nlog: {{path: {dir / 'guard.db'}}}\n{access}"
    )
    return path


@pytest.fixture(scope="module")
def http(tiny_model_dir, tmp_path_factory):
    dir = tmp_path_factory.mktemp("access")
    paths = [
        write_policy(dir, tiny_model_dir, "public"),
        write_policy(dir, tiny_model_dir, "tenant-a", "access: {api_keys: [key-a]}\n"),
        write_policy(
            dir, tiny_model_dir, "tenant-b", "access: {api_key_env: [GUARD_TEST_TENANT_B]}\n"
        ),
        write_policy(dir, tiny_model_dir, "shared", "access: {api_keys: [key-a, key-b2]}\n"),
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GUARD_TEST_TENANT_B", "key-b1, key-b2")
        settings = ServerSettings(
            policy_paths=tuple(map(str, paths)), api_keys=("root",), reload_interval_s=None
        )
        with TestClient(create_app(settings)) as client:
            yield client


def client(http: TestClient, key: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0
    )


@pytest.mark.parametrize(
    "key, visible",
    [
        ("root", ["public", "tenant-a", "tenant-b", "shared"]),
        ("key-a", ["tenant-a", "shared"]),
        ("key-b1", ["tenant-b"]),
        ("key-b2", ["tenant-b", "shared"]),
    ],
)
def test_models_lists_only_what_the_key_may_use(http, key, visible):
    assert [m.id for m in client(http, key).models.list()] == visible


def test_a_bound_key_uses_its_policies(http):
    resp = client(http, "key-b1").chat.completions.create(
        model="tenant-b", messages=HI, max_tokens=2
    )
    assert resp.model == "tenant-b" and resp.choices


@pytest.mark.parametrize("model", ["tenant-b", "public", "no-such-model"])
def test_other_policies_look_like_missing_models(http, model):
    with pytest.raises(openai.NotFoundError) as info:
        client(http, "key-a").chat.completions.create(model=model, messages=HI, max_tokens=2)
    error = info.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "tenant-b" not in error["message"].split("Served models:")[1], (
        "no other tenant's policy named"
    )
    assert "shared" in error["message"]
    r = http.get(f"/v1/models/{model}", headers={"Authorization": "Bearer key-a"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_global_key_uses_every_policy_and_completions_are_bound_too(http):
    assert (
        client(http, "root").completions.create(model="tenant-a", prompt="Hi", max_tokens=2).choices
    )
    with pytest.raises(openai.NotFoundError):
        client(http, "key-b1").completions.create(model="tenant-a", prompt="Hi", max_tokens=2)


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "key-a"}]
)
def test_missing_or_unknown_keys_are_401(http, headers):
    r = http.get("/v1/models", headers=headers)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_bound_keys_alone_turn_authentication_on(tiny_model_dir, tmp_path):
    paths = (
        str(write_policy(tmp_path, tiny_model_dir, "open")),
        str(write_policy(tmp_path, tiny_model_dir, "tenant", "access: {api_keys: [k]}\n")),
    )
    with TestClient(create_app(ServerSettings(policy_paths=paths, reload_interval_s=None))) as http:
        assert http.get("/v1/models").status_code == 401
        assert [m.id for m in client(http, "k").models.list()] == ["tenant"]


def test_unset_key_variable_fails_loudly(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("GUARD_TEST_UNSET", raising=False)
    path = write_policy(
        tmp_path, tiny_model_dir, "t", "access: {api_key_env: [GUARD_TEST_UNSET]}\n"
    )
    with (
        pytest.raises(
            PolicyError, match=r"access.api_key_env\[0\]: environment variable GUARD_TEST_UNSET"
        ),
        TestClient(create_app(ServerSettings(policy_paths=(str(path),), reload_interval_s=None))),
    ):
        pass
