"""Many replicas, one log: `guard serve` processes sharing one Postgres database (tests/pg.py).

Both replicas start at once on an empty database (the migrations race), then take concurrent
flagged traffic (the shadow probe of tests/test_drain.py fires on every token); every answer's
log id must be in the database exactly once, each request once, and a label written through one
replica's review API must be what the other replica serves.
"""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import psycopg
import pytest
from test_drain import ORGANISM, chat_body, flag_everything_policy

from guard.logstore.migrations import MIGRATIONS
from guard.testing import serve_in_subprocess

ADMIN = "admin-key-for-the-replicas-test"
REVIEW = "/v1/guard/review"

pytestmark = pytest.mark.skipif(
    not (ORGANISM / "probe" / "probe.json").is_file(),
    reason="models/organism (with its probe) is not built",
)


def _ask(url: str, i: int) -> tuple[str, str]:
    """One flagged chat completion; (request id, log id), streamed for odd ``i``."""
    body = chat_body(i, 24, stream=bool(i % 2))
    body["messages"][0]["content"] = f"Request {i}: tell me a story."
    if not body["stream"]:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        data = r.json()
        return data["id"], data["choices"][0]["guard"]["log_id"]
    log_id = rid = None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = httpx.Response(200, content=line[6:]).json()
                rid = chunk["id"]
                for c in chunk["choices"]:
                    log_id = (c.get("guard") or {}).get("log_id") or log_id
    return rid, log_id


def test_two_replicas_share_one_postgres_log_without_losing_or_duplicating_records(
    pg_url, tmp_path, monkeypatch
):
    url = pg_url()
    policy = flag_everything_policy(
        tmp_path, log=str(tmp_path / "unused.db")
    )  # --log-url replaces it
    monkeypatch.setenv("GUARD_ADMIN_KEY", ADMIN)
    with cf.ThreadPoolExecutor(
        2
    ) as pool:  # start both at once: they migrate the empty database together
        started = list(
            pool.map(
                lambda i: serve_in_subprocess(
                    [policy], tmp_path / f"replica{i}.log", "--log-url", url
                ),
                range(2),
            )
        )
    procs, urls = [p for p, _ in started], [u for _, u in started]
    try:
        n = 16
        with cf.ThreadPoolExecutor(
            8
        ) as pool:  # alternate replicas, as a round-robin balancer would
            answers = list(pool.map(lambda i: _ask(urls[i % 2], i), range(n)))
        request_ids = [rid for rid, _ in answers]
        log_ids = [lid for _, lid in answers]
        assert all(log_ids) and len(set(log_ids)) == n and len(set(request_ids)) == n

        with psycopg.connect(url) as db:
            rows = db.execute("SELECT id, request_id FROM generations").fetchall()
            migrations = db.execute(
                "SELECT name, count(*) FROM _migrations GROUP BY name"
            ).fetchall()
        assert sorted(r[0] for r in rows) == sorted(log_ids)  # none lost, none extra
        assert sorted(r[1] for r in rows) == sorted(request_ids)  # each request exactly once
        assert dict(migrations) == {fn.__name__: 1 for fn in MIGRATIONS}

        auth = {"Authorization": f"Bearer {ADMIN}"}
        for u in urls:  # each replica lists every record, whichever replica wrote it
            listed = httpx.get(
                f"{u}{REVIEW}/logs", params={"limit": 100}, headers=auth, timeout=30
            ).json()
            assert listed["total"] == n and {i["id"] for i in listed["items"]} == set(log_ids)
        written_by_0 = log_ids[
            0
        ]  # request 0 went to replica 0; label it on replica 1, read it on 0
        r = httpx.post(
            f"{urls[1]}{REVIEW}/logs/{written_by_0}/labels",
            headers=auth,
            timeout=30,
            json={
                "label": "true_positive",
                "note": "seen from the other replica",
                "reviewer": "ops",
            },
        )
        assert r.status_code == 200, r.text
        seen = httpx.get(f"{urls[0]}{REVIEW}/logs/{written_by_0}", headers=auth, timeout=30).json()
        assert [(lb["label"], lb["note"]) for lb in seen["labels"]] == [
            ("true_positive", "seen from the other replica")
        ]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(60)
    assert not (tmp_path / "unused.db").exists()  # the policy's own log target was replaced
