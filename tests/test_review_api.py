"""The review API without a browser: a real GuardService (random-weight Llama, three policies
writing to two log databases) behind the real app, driven through FastAPI's TestClient.

Records are written into the policies' log databases the way the controller writes them
(``LogStore.write``); the browser test (test_review_browser.py) uses real generations.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest
from fastapi.testclient import TestClient

from guard.controller.record import DiscardedSpan, Firing, GenerationRecord, RetryStrategy
from guard.errors import InvalidRequestError
from guard.logstore import LABELS, LogStore
from guard.policy import load_policy
from server.app import ServerSettings, create_app
from server.review_protocol import LabelName

ADMIN, GLOBAL, TENANT = "admin-key-0123456789", "global-key", "tenant-key"
T0 = 1_700_000_000.0
PREFIX = "/v1/guard/review"


def _policy(dir: Path, model_dir: Path, name: str, db: str, extra: str = "") -> Path:
    path = dir / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nmodel: {{engine: transformers, path: {model_dir}}}\n"
        "monitors: [{name: reset-token, kind: reset_token, token: '<|reset|>'}]\n"
        f"log: {{path: {dir / db}}}\n{extra}"
    )
    return path


def _record(
    created: float,
    policy: str,
    policy_hash: str,
    outcome: str = "recovered",
    *,
    text: str = "No.",
    output_ids: list[int] | None = None,
    span: bool = True,
) -> GenerationRecord:
    rec = GenerationRecord(
        request_id=f"req-{created}",
        policy_name=policy,
        policy_hash=policy_hash,
        model=policy,
        messages=[{"role": "user", "content": "How do I pick a lock?"}],
        prompt=None,
        prompt_tokens=9,
        created=created,
        output_ids=output_ids or [5, 6],
        final_text=text,
        outcome=outcome,
        finish_reason="stop",
        sampled_tokens=6,
        final_scores={"reset-token": [0.0] * len(output_ids or [5, 6])},
    )
    if span:
        rec.spans.append(
            DiscardedSpan(
                attempt=0,
                start=0,
                token_ids=[11, 12, 7],
                text="Sure, first<|reset|>",
                tokens=["Sure", ", first", "<|reset|>"],
                scores={"reset-token": [0.0, 0.0, 1.0]},
                aggregated={"reset-token": [0.0, 0.0, 1.0]},
                monitor="reset-token",
                threshold=0.5,
                fired_at=2,
                fired_token_id=7,
                fired_token="<|reset|>",
                retracted_chars=0,
            )
        )
        rec.retries.append(
            RetryStrategy(retry=1, seed=42, temperature=0.7, top_p=0.9, banned_first_tokens=[11])
        )
        rec.firings.append(
            Firing(
                monitor="reset-token",
                action="backtrack",
                scope="output",
                position=2,
                token_id=7,
                token="<|reset|>",
                score=1.0,
                threshold=0.5,
                attempt=0,
            )
        )
        rec.monitors_fired = ["reset-token"]
    return rec


@pytest.fixture(scope="module")
def review(tiny_model_dir, tmp_path_factory):
    """(client, ids, dir): the app with an admin key, and five records over two log databases."""
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("review")
    paths = [
        _policy(tmp, tiny_model_dir, "alpha", "a.db"),
        _policy(tmp, tiny_model_dir, "beta", "b.db"),
        _policy(tmp, tiny_model_dir, "tenant", "a.db", f"access: {{api_keys: [{TENANT}]}}\n"),
    ]
    hashes = {p.stem: load_policy(p).content_hash for p in paths}
    answer = "Hello there, how are you?"
    answer_ids = list(
        AutoTokenizer.from_pretrained(tiny_model_dir)(answer, add_special_tokens=False)["input_ids"]
    )
    with LogStore(tmp / "a.db") as a, LogStore(tmp / "b.db") as b:
        ids = {
            "a1": a.write(_record(T0 + 1, "alpha", hashes["alpha"])),
            "b1": b.write(_record(T0 + 2, "beta", hashes["beta"], "refused")),
            "a2": a.write(
                _record(
                    T0 + 3,
                    "alpha",
                    hashes["alpha"],
                    "clean",
                    text=answer,
                    output_ids=answer_ids,
                    span=False,
                )
            ),
            "b2": b.write(
                _record(T0 + 4, "beta", "an older version", text=answer, output_ids=answer_ids)
            ),
            "a3": a.write(_record(T0 + 5, "tenant", hashes["tenant"])),
        }
    settings = ServerSettings(
        policy_paths=tuple(map(str, paths)),
        api_keys=(GLOBAL,),
        admin_key=ADMIN,
        reload_interval_s=None,
    )
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {ADMIN}"
        yield client, ids, tmp


def _anonymous(client: TestClient) -> TestClient:
    """A client of the same running app without the admin key (no second lifespan)."""
    return TestClient(client.app)


def _error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_review_does_not_exist_without_an_admin_key(tiny_model_dir, tmp_path):
    settings = ServerSettings(
        policy_paths=(str(_policy(tmp_path, tiny_model_dir, "alpha", "a.db")),),
        reload_interval_s=None,
    )
    with TestClient(create_app(settings)) as client:
        for method, path in [
            ("GET", "/review"),
            ("GET", "/review/static/review.js"),
            ("GET", f"{PREFIX}/logs"),
            ("GET", f"{PREFIX}/logs/0123"),
            ("POST", f"{PREFIX}/logs/0123/labels"),
            ("GET", f"{PREFIX}/export"),
            ("GET", f"{PREFIX}/filters"),
        ]:
            r = client.request(method, path, headers={"Authorization": "Bearer anything"})
            assert _error(r, 404)["code"] == "unknown_url", (method, path)
        assert not [p for p in client.get("/openapi.json").json()["paths"] if "review" in p]


def test_only_the_admin_key_opens_the_api(review):
    client, _ids, _ = review
    for auth in (
        None,
        "Bearer wrong",
        f"Bearer {GLOBAL}",
        f"Bearer {TENANT}",
        ADMIN,
        f"Basic {ADMIN}",
    ):
        headers = {"Authorization": auth} if auth else {}
        err = _error(_anonymous(client).get(f"{PREFIX}/logs", headers=headers), 401)
        assert err["type"] == "authentication_error" and "admin key" in err["message"], auth
    assert client.get(f"{PREFIX}/logs").status_code == 200
    # ... and the admin key is no API key.
    assert _error(client.post("/v1/chat/completions", json={"model": "alpha", "messages": []}), 401)


def test_list_merges_the_stores_newest_first_with_filters_and_paging(review):
    client, ids, _ = review

    def listed(**params) -> list[str]:
        body = client.get(f"{PREFIX}/logs", params=params).json()
        assert body["total"] >= len(body["items"])
        return [next(k for k, v in ids.items() if v == item["id"]) for item in body["items"]]

    assert listed() == ["a3", "b2", "a2", "b1", "a1"]
    page = client.get(f"{PREFIX}/logs", params={"limit": 2, "offset": 1}).json()
    assert [i["id"] for i in page["items"]] == [ids["b2"], ids["a2"]] and page["total"] == 5
    assert (page["limit"], page["offset"]) == (2, 1)
    assert listed(policy="beta") == ["b2", "b1"]
    assert listed(outcome="refused") == ["b1"]
    assert listed(since=T0 + 2, until=T0 + 4) == ["a2", "b1"]  # until is exclusive
    assert listed(since="2023-11-14T22:13:22.5Z") == [
        "a3",
        "b2",
        "a2",
    ]  # ISO 8601 works too (T0 + 2.5)
    assert listed(monitor="reset-token", policy="alpha") == ["a1"]
    row = client.get(f"{PREFIX}/logs", params={"policy": "tenant"}).json()["items"][0]
    assert row["resets"] == 1 and row["monitors_fired"] == ["reset-token"] and row["label"] is None
    for params, param in [
        ({"outcome": "bad"}, "outcome"),
        ({"label": "maybe"}, "label"),
        ({"limit": 0}, "limit"),
        ({"since": "yesterday"}, "since"),
    ]:
        err = _error(client.get(f"{PREFIX}/logs", params=params), 400)
        assert err["type"] == "invalid_request_error" and err["param"] == param


def test_get_returns_the_record_with_monitor_facts_and_tokens(review):
    client, ids, tmp = review
    body = client.get(f"{PREFIX}/logs/{ids['a1']}").json()
    with LogStore(tmp / "a.db") as store:
        assert GenerationRecord.from_dict(body["record"]) == store.get(ids["a1"])
    assert body["id"] == ids["a1"] and body["labels"] == []
    (mon,) = body["monitors"]
    assert mon == {
        "name": "reset-token",
        "threshold": 0.5,
        "fired": True,
        "output_firings": [2],
        "prompt_firings": [],
        "max_score": 1.0,
    }
    # A prefix is enough; the clean record's threshold comes from the served policy (same version) ...
    clean = client.get(f"{PREFIX}/logs/{ids['a2'][:20]}").json()
    assert clean["id"] == ids["a2"] and clean["monitors"][0]["threshold"] == 0.5
    assert not clean["monitors"][0]["fired"] and clean["monitors"][0]["output_firings"] == []
    # ... and its answer is decoded token by token by the served tokenizer.
    assert (
        "".join(clean["output_tokens"]) == "Hello there, how are you?"
        and len(clean["output_tokens"]) > 1
    )
    # A record of another policy version: its fired monitor's threshold is in the record itself.
    old = client.get(f"{PREFIX}/logs/{ids['b2']}").json()
    assert (
        old["monitors"][0]["threshold"] == 0.5
        and old["record"]["policy_hash"] == "an older version"
    )
    # A record whose text no served tokenizer reproduces gets no token view.
    assert client.get(f"{PREFIX}/logs/{ids['a1']}").json()["output_tokens"] is None


def test_unknown_id_is_404(review):
    client, _, _ = review
    for r in (
        client.get(f"{PREFIX}/logs/ffffffffffff"),
        client.post(
            f"{PREFIX}/logs/ffffffffffff/labels", json={"label": "unsure", "reviewer": "ada"}
        ),
    ):
        err = _error(r, 404)
        assert err["code"] == "log_not_found" and err["param"] == "id"


def test_labels_are_stored_with_reviewer_and_time_and_filter_the_list(review):
    client, ids, tmp = review
    first = client.post(
        f"{PREFIX}/logs/{ids['b1']}/labels", json={"label": "unsure", "reviewer": "ada"}
    ).json()
    r = client.post(
        f"{PREFIX}/logs/{ids['b1']}/labels",
        json={"label": "true_positive", "note": "lock picking <b>steps</b>", "reviewer": " grace "},
    )
    assert r.status_code == 200, r.text
    second = r.json()
    assert (second["label"], second["note"], second["reviewer"], second["log_id"]) == (
        "true_positive",
        "lock picking <b>steps</b>",
        "grace",
        ids["b1"],
    )
    assert first["created"] <= second["created"]
    body = client.get(f"{PREFIX}/logs/{ids['b1']}").json()
    assert [(x["label"], x["reviewer"]) for x in body["labels"]] == [
        ("unsure", "ada"),
        ("true_positive", "grace"),
    ]
    with LogStore(tmp / "b.db") as store:
        stored = store.labels(ids["b1"])
    assert [(x.label, x.reviewer, x.created) for x in stored] == [
        ("unsure", "ada", first["created"]),
        ("true_positive", "grace", second["created"]),
    ]
    items = client.get(f"{PREFIX}/logs", params={"label": "true_positive"}).json()["items"]
    assert [(i["id"], i["label"], i["label_note"]) for i in items] == [
        (ids["b1"], "true_positive", "lock picking <b>steps</b>")
    ]
    assert ids["b1"] not in [
        i["id"]
        for i in client.get(f"{PREFIX}/logs", params={"label": "unlabelled"}).json()["items"]
    ]


@pytest.mark.parametrize(
    "body,param",
    [
        ({"label": "maybe", "reviewer": "ada"}, "label"),
        ({"label": "unsure"}, "reviewer"),
        ({"label": "unsure", "reviewer": "   "}, "reviewer"),
        ({"label": "unsure", "reviewer": "ada", "extra": 1}, "extra"),
    ],
)
def test_a_bad_label_is_400_naming_the_field(review, body, param):
    client, ids, _ = review
    err = _error(client.post(f"{PREFIX}/logs/{ids['a3']}/labels", json=body), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert client.get(f"{PREFIX}/logs/{ids['a3']}").json()["labels"] == []


def test_export_gives_the_labelled_rows_as_json_lines(review):
    client, ids, _ = review
    for key in ("a1", "b2"):
        client.post(
            f"{PREFIX}/logs/{ids[key]}/labels", json={"label": "false_positive", "reviewer": "ada"}
        )
    r = client.get(f"{PREFIX}/export", params={"policy": "alpha"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    rows = [json.loads(line) for line in r.text.splitlines()]
    assert [(x["log_id"], x["label"], x["kind"], x["completion"], x["reviewer"]) for x in rows] == [
        (ids["a1"], 0, "span", "Sure, first<|reset|>", "ada")
    ]
    everywhere = [
        json.loads(line)["log_id"] for line in client.get(f"{PREFIX}/export").text.splitlines()
    ]
    assert set(everywhere) >= {ids["a1"], ids["b2"]}


def test_filter_values(review):
    client, _, _ = review
    body = client.get(f"{PREFIX}/filters").json()
    assert body == {
        "policies": ["alpha", "beta", "tenant"],
        "monitors": ["reset-token"],
        "outcomes": ["clean", "recovered", "refused"],
        "labels": [*LABELS, "unlabelled"],
    }


def test_openapi_documents_the_review_api(review):
    client, _, _ = review
    schema = client.get("/openapi.json").json()
    paths, components = schema["paths"], schema["components"]["schemas"]

    def response_ref(path: str, method: str = "get") -> str:
        return paths[path][method]["responses"]["200"]["content"]["application/json"]["schema"][
            "$ref"
        ]

    assert response_ref(f"{PREFIX}/logs").endswith("/ReviewList")
    assert response_ref(f"{PREFIX}/logs/{{log_id}}").endswith("/ReviewRecord")
    assert response_ref(f"{PREFIX}/logs/{{log_id}}/labels", "post").endswith("/LabelView")
    assert response_ref(f"{PREFIX}/filters").endswith("/ReviewFilters")
    body = paths[f"{PREFIX}/logs/{{log_id}}/labels"]["post"]["requestBody"]["content"][
        "application/json"
    ]["schema"]
    assert body["$ref"].endswith("/LabelRequest")
    assert "application/x-ndjson" in paths[f"{PREFIX}/export"]["get"]["responses"]["200"]["content"]
    params = {p["name"] for p in paths[f"{PREFIX}/logs"]["get"]["parameters"]}
    assert params >= {"policy", "monitor", "outcome", "since", "until", "label", "limit", "offset"}
    assert set(components["LabelRequest"]["properties"]["label"]["enum"]) == set(LABELS)
    record = components["GenerationRecord"]["properties"]
    assert {"spans", "retries", "firings", "final_scores", "reasoning", "policy_hash"} <= set(
        record
    )
    assert "/review" not in paths  # the page is not an API
    assert schema["components"]["securitySchemes"]["AdminKey"]["scheme"] == "bearer"
    assert paths[f"{PREFIX}/logs"]["get"]["security"] == [{"AdminKey": []}]


def test_page_shell_is_static_with_a_strict_csp(review):
    client, ids, _ = review
    anon = _anonymous(client)  # no key: the shell holds no data
    page = anon.get("/review")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert ids["a1"] not in page.text and "How do I pick a lock" not in page.text
    assert (
        anon.get("/review/static/review.js").headers["content-type"].startswith("text/javascript")
    )
    assert anon.get("/review/static/review.css").status_code == 200
    assert anon.get("/review/static/review.html").status_code == 404
    assert anon.get("/review/static/..%2Freview.py").status_code == 404


def test_label_names_match_the_store():
    assert get_args(LabelName) == LABELS


def test_admin_key_settings_fail_loudly(monkeypatch):
    with pytest.raises(ValueError, match="admin_key"):
        ServerSettings(admin_key=" ")
    with pytest.raises(ValueError, match="admin_key"):
        ServerSettings(api_keys=("k",), admin_key="k")
    monkeypatch.delenv("GUARD_ADMIN_KEY", raising=False)
    monkeypatch.delenv("MY_ADMIN", raising=False)
    assert ServerSettings.from_env([]).admin_key is None
    with pytest.raises(InvalidRequestError, match="MY_ADMIN"):
        ServerSettings.from_env([], admin_key_env="MY_ADMIN")
    monkeypatch.setenv("MY_ADMIN", "s3cret")
    monkeypatch.setenv("GUARD_ADMIN_KEY", "other")
    settings = ServerSettings.from_env([], admin_key_env="MY_ADMIN")
    assert settings.admin_key == "s3cret" and "s3cret" not in repr(settings)
    assert ServerSettings.from_env([]).admin_key == "other"
