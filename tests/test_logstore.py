"""The log store on SQLite and Postgres: exact round trips, filters, labels, purge, migrations,
concurrency and durability. Storage tests run once per backend (``target`` is parametrised);
the Postgres runs use a throwaway cluster (tests/pg.py) and skip without server binaries."""

from __future__ import annotations

import json
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from guard.controller.record import (
    DiscardedSpan,
    Firing,
    GenerationRecord,
    MonitorError,
    RetryStrategy,
    Steer,
)
from guard.errors import InvalidRequestError, NotFoundError
from guard.logstore import LABELS, MIGRATIONS, Label, LogStore, migrations
from guard.logstore import tables as t


@pytest.fixture(params=["sqlite", "postgres"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh log target: a SQLite path, or the URL of an empty Postgres database."""
    if request.param == "sqlite":
        return str(tmp_path / "sub" / "guard.db")
    return request.getfixturevalue("pg_url")()


@pytest.fixture
def store(target: str):
    with LogStore(target) as s:
        yield s


def make_record(
    created: float = 1_700_000_000.123456,
    policy: str = "demo",
    outcome: str = "recovered",
    monitor: str = "harm-probe",
    spans: int = 1,
    text: str = "Here is a safe answer.",
) -> GenerationRecord:
    record = GenerationRecord(
        request_id=f"req-{created}",
        policy_name=policy,
        policy_hash="ab" * 32,
        model="organism",
        messages=[
            {"role": "system", "content": "be nice"},
            {"role": "user", "content": "how do I é?"},
        ],
        prompt=None,
        prompt_tokens=17,
        created=created,
        output_ids=[5, 6, 7],
        final_text=text,
        outcome=outcome,
        finish_reason="stop",
        sampled_tokens=3 + 4 * spans,
        final_scores={monitor: [0.1, 0.2, 1 / 3]},
        monitors_fired=[monitor] if spans else [],
    )
    for i in range(spans):
        record.spans.append(
            DiscardedSpan(
                attempt=i,
                start=2,
                token_ids=[11, 12, 13, 14],
                text=" Sure, mix",
                tokens=[" Sure", ",", " mix", "\n"],
                scores={monitor: [0.1, 0.7, 0.95, 0.30000000000000004], "other": [0.0, 0.0, 0.0]},
                aggregated={monitor: [0.1, 0.4, 0.675, 0.4875]},
                monitor=monitor,
                threshold=0.6,
                fired_at=4,
                fired_token_id=13,
                fired_token=" mix",
                retracted_chars=i,
            )
        )
        record.retries.append(
            RetryStrategy(
                retry=i + 1,
                seed=1234 + i,
                temperature=0.7,
                top_p=0.9,
                banned_first_tokens=[11],
                steer=Steer(monitor=monitor, layer=6, alpha=4.0) if i else None,
            )
        )
    return record


def full_record() -> GenerationRecord:
    """A record using every field: firings, prompt scores, monitor errors, reasoning, seed."""
    rec = make_record(spans=2)
    rec.firings = [
        Firing(
            monitor="shadow-probe",
            action="log",
            scope="output",
            position=3,
            token_id=9,
            token=" x",
            score=0.81,
            threshold=0.5,
            attempt=0,
        )
    ]
    rec.prompt_scores = {"risk-probe": [0.1, 0.7, 1e-300]}
    rec.monitor_errors = [
        MonitorError(
            monitor="sae",
            scope="output",
            error="ValueError: boom",
            position=2,
            attempt=0,
            handling="disabled",
        )
    ]
    rec.deliberation, rec.reasoning, rec.reasoning_ids, rec.reasoning_forced_tokens = (
        "on_risk",
        "<|think|>Rule 1 applies.<|/think|>",
        [1, 2, 3, 4],
        2,
    )
    rec.seed = 2**40 + 7
    return rec


def raw(store: LogStore, sql: str, **params) -> list[tuple]:
    """Rows of ``sql`` run on the store's database through a connection of its own."""
    engine = create_engine(store.url)
    try:
        with engine.connect() as db:
            return [tuple(r) for r in db.execute(text(sql), params)]
    finally:
        engine.dispose()


# -- records ------------------------------------------------------------------------------------


def test_write_get_round_trip_is_exact(store: LogStore):
    for record in (
        make_record(),
        make_record(spans=0, outcome="clean"),
        make_record(spans=3, outcome="refused"),
        full_record(),
    ):
        assert store.get(store.write(record)) == record


def test_completion_records_round_trip(store: LogStore):
    record = make_record()
    record.messages, record.prompt, record.finish_reason = None, "Once upon", None
    assert store.get(store.write(record)) == record


def test_nul_characters_round_trip_on_sqlite_and_become_fffd_on_postgres(store: LogStore):
    record = make_record(text="a\x00b")
    record.spans[0].fired_token = "\x00"
    got = store.get(store.write(record))
    if store.dialect == "sqlite":
        assert got == record
    else:
        assert (got.final_text, got.spans[0].fired_token) == ("a\ufffdb", "\ufffd")


def test_spans_and_monitors_are_stored_one_row_each(store: LogStore):
    log_id = store.write(make_record(spans=3))
    rows = raw(
        store,
        "SELECT idx, monitor, scores FROM spans WHERE generation_id = :g ORDER BY idx",
        g=log_id,
    )
    assert [r[0] for r in rows] == [0, 1, 2]
    assert json.loads(rows[0][2])["harm-probe"][2] == 0.95
    assert raw(store, "SELECT resets FROM generations WHERE id = :g", g=log_id) == [(3,)]
    assert raw(
        store, "SELECT monitor FROM generation_monitors WHERE generation_id = :g", g=log_id
    ) == [("harm-probe",)]


def test_get_unknown_id_raises_not_found(store: LogStore):
    with pytest.raises(NotFoundError, match="no log record") as info:
        store.get("nope")
    assert info.value.param == "id"


def test_ids_sort_by_write_time_and_resolve_by_prefix(store: LogStore):
    a, b = store.write(make_record()), store.write(make_record())
    assert len(a) == 32 and a[:12] <= b[:12]
    assert store.resolve_id(a[:20]) == a
    with pytest.raises(InvalidRequestError, match="ambiguous"):
        store.resolve_id("")
    for not_an_id in ("zz", "_", "%"):  # LIKE wildcards are matched literally
        with pytest.raises(NotFoundError):
            store.resolve_id(not_an_id)


# -- filters ------------------------------------------------------------------------------------


@pytest.fixture
def three(store: LogStore) -> dict[str, str]:
    return {
        "old": store.write(
            make_record(created=100.0, policy="demo", outcome="recovered", monitor="harm-probe")
        ),
        "mid": store.write(
            make_record(created=200.0, policy="other", outcome="refused", monitor="reset-token")
        ),
        "new": store.write(make_record(created=300.0, policy="demo", outcome="clean", spans=0)),
    }


def test_list_orders_newest_first_and_pages(store: LogStore, three: dict[str, str]):
    assert [s.id for s in store.list()] == [three["new"], three["mid"], three["old"]]
    assert [s.id for s in store.list(limit=1)] == [three["new"]]
    assert [s.id for s in store.list(limit=1, offset=1)] == [three["mid"]]
    assert [s.id for s in store.list(limit=5, offset=2)] == [three["old"]]
    assert store.list(offset=3) == [] and store.count() == 3
    with pytest.raises(InvalidRequestError):
        store.list(limit=-1)


@pytest.mark.parametrize(
    "filters, expected",
    [
        ({"policy": "demo"}, ["new", "old"]),
        ({"outcome": "refused"}, ["mid"]),
        ({"monitor": "harm-probe"}, ["old"]),
        ({"since": 200.0}, ["new", "mid"]),
        ({"until": 200.0}, ["old"]),
        (
            {
                "since": datetime.fromtimestamp(150, tz=timezone.utc),
                "until": datetime.fromtimestamp(300, tz=timezone.utc),
            },
            ["mid"],
        ),
        ({"policy": "demo", "outcome": "refused"}, []),
        ({"policy": "demo", "since": 150}, ["new"]),
        (
            {"policy": "other", "monitor": "reset-token", "outcome": "refused", "until": 250},
            ["mid"],
        ),
        ({"label": "unlabelled"}, ["new", "mid", "old"]),
    ],
)
def test_list_and_count_filter(
    store: LogStore, three: dict[str, str], filters: dict, expected: list[str]
):
    assert [s.id for s in store.list(**filters)] == [three[k] for k in expected]
    assert store.count(**filters) == len(expected)


def test_summary_fields(store: LogStore, three: dict[str, str]):
    summary = store.list(outcome="refused")[0]
    assert (summary.resets, summary.monitors_fired, summary.preview) == (
        1,
        ["reset-token"],
        "Here is a safe answer.",
    )
    assert (summary.policy_name, summary.created, summary.label, summary.label_note) == (
        "other",
        200.0,
        None,
        None,
    )
    store.write(make_record(created=400.0, text="x" * 300))
    assert store.list(limit=1)[0].preview == "x" * 200


def test_monitor_filter_sees_span_monitors_and_log_only_firings(store: LogStore):
    errored = make_record(created=1.0, monitor="sae")  # a fail_closed error: a span, but no firing
    errored.monitors_fired = []
    shadow = make_record(created=2.0, spans=0)
    shadow.monitors_fired = ["shadow"]
    ids = [store.write(errored), store.write(shadow)]
    assert [s.id for s in store.list(monitor="sae")] == [ids[0]]
    assert [s.id for s in store.list(monitor="shadow")] == [ids[1]]
    assert store.monitors() == ["sae", "shadow"]


def test_policies_and_monitors_are_distinct_and_sorted(store: LogStore, three: dict[str, str]):
    store.write(make_record(policy="demo", monitor="harm-probe"))
    assert store.policies() == ["demo", "other"]
    assert store.monitors() == ["harm-probe", "reset-token"]


# -- labels -------------------------------------------------------------------------------------


def test_labels_keep_history_and_the_latest_wins(store: LogStore, three: dict[str, str]):
    first = store.label(three["old"], "true_positive", reviewer="ann", note="clearly harmful")
    assert isinstance(first, Label) and (first.log_id, first.label, first.reviewer) == (
        three["old"],
        "true_positive",
        "ann",
    )
    store.label(three["old"], "false_positive", reviewer="bob", note="it was a recipe")
    store.label(three["mid"], "unsure", reviewer="ann")
    history = store.labels(three["old"])
    assert [(h.label, h.reviewer, h.note) for h in history] == [
        ("true_positive", "ann", "clearly harmful"),
        ("false_positive", "bob", "it was a recipe"),
    ]
    assert history[0].created <= history[1].created
    assert store.labels(three["new"]) == []
    by_id = {s.id: s for s in store.list()}
    assert (by_id[three["old"]].label, by_id[three["old"]].label_note) == (
        "false_positive",
        "it was a recipe",
    )
    assert (by_id[three["mid"]].label, by_id[three["new"]].label) == ("unsure", None)
    assert [s.id for s in store.list(label="false_positive")] == [three["old"]]
    assert store.list(label="true_positive") == []  # superseded
    assert [s.id for s in store.list(label="unlabelled")] == [three["new"]]
    assert store.count(label="unsure") == 1 and store.count(label="unlabelled", policy="demo") == 1


def test_label_errors(store: LogStore, three: dict[str, str]):
    with pytest.raises(NotFoundError) as info:
        store.label("f" * 32, "unsure", reviewer="ann")
    assert info.value.param == "id"
    with pytest.raises(InvalidRequestError, match="true_positive, false_positive, unsure") as info:
        store.label(three["old"], "wrong", reviewer="ann")
    assert info.value.param == "label"
    with pytest.raises(InvalidRequestError) as info:
        store.label(three["old"], "unsure", reviewer=" ")
    assert info.value.param == "reviewer"
    with pytest.raises(InvalidRequestError) as info:
        store.list(label="maybe")
    assert info.value.param == "label"
    with pytest.raises(NotFoundError):
        store.labels("f" * 32)
    assert store.labels(three["old"]) == []  # nothing was stored by the failed calls
    assert LABELS == ("true_positive", "false_positive", "unsure")


# -- retention ----------------------------------------------------------------------------------


def test_purge_deletes_old_records_with_their_spans_labels_and_monitors(
    store: LogStore, three: dict[str, str]
):
    store.label(three["old"], "true_positive", reviewer="ann")
    store.label(three["new"], "unsure", reviewer="ann")
    assert store.purge(before=250.0) == 2
    assert [s.id for s in store.list()] == [three["new"]]
    for old in ("old", "mid"):
        with pytest.raises(NotFoundError):
            store.get(three[old])
    for table in ("spans", "generation_monitors", "labels"):
        assert raw(
            store, f"SELECT count(*) FROM {table} WHERE generation_id <> :g", g=three["new"]
        ) == [(0,)]
    assert store.labels(three["new"])[0].label == "unsure"
    assert store.policies() == ["demo"] and store.monitors() == []
    assert (
        store.purge(before=datetime.fromtimestamp(300, tz=timezone.utc)) == 0
    )  # 'before' is exclusive
    assert (
        store.purge(before=datetime.fromtimestamp(301, tz=timezone.utc)) == 1 and store.count() == 0
    )


# -- schema, concurrency, durability ------------------------------------------------------------


def test_migrations_are_recorded_and_idempotent_on_reopen(target: str):
    names = [fn.__name__ for fn in MIGRATIONS]
    with LogStore(target) as first:
        log_id = first.write(full_record())
        assert first.migrations() == names
    with LogStore(target) as again:
        assert again.migrations() == names
        assert again.get(log_id) == full_record()
        assert raw(again, "SELECT count(*) FROM _migrations") == [(len(names),)]


def test_tables_module_matches_the_migrated_schema(store: LogStore):
    engine = create_engine(store.url)
    try:
        found = inspect(engine)
        for table in t.metadata.sorted_tables:
            assert [c["name"] for c in found.get_columns(table.name)] == [
                c.name for c in table.columns
            ]
            assert found.get_pk_constraint(table.name)["constrained_columns"] == [
                c.name for c in table.primary_key
            ]
    finally:
        engine.dispose()


def test_stores_opening_a_new_database_at_once_migrate_it_once(target: str):
    barrier, stores, errors = threading.Barrier(4), [], []

    def open_store() -> None:
        barrier.wait()
        try:
            stores.append(LogStore(target))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == [] and len(stores) == 4
    assert stores[0].migrations() == [fn.__name__ for fn in MIGRATIONS]
    log_id = stores[1].write(make_record())
    assert stores[2].get(log_id) == make_record()
    for s in stores:
        s.close()


def test_old_database_is_migrated_and_backfilled(target: str, monkeypatch: pytest.MonkeyPatch):
    """A log written before m004 (monitor table) and m006 (seed) gains both on open."""
    monkeypatch.setattr(migrations, "MIGRATIONS", MIGRATIONS[:3])
    errored = make_record(created=1.0, monitor="sae")
    errored.monitors_fired = ["shadow"]
    with LogStore(target) as old:
        row = old._generation_row("0" * 32, errored)
        del row["seed"], row["complete"]  # columns of later migrations
        spans = [old._span_row("0" * 32, i, s) for i, s in enumerate(errored.spans)]
        engine = create_engine(old.url)
        with engine.begin() as db:
            db.execute(t.generations.insert(), row)
            db.execute(t.spans.insert(), spans)
        engine.dispose()
    monkeypatch.undo()
    with LogStore(target) as new:
        assert new.migrations() == [fn.__name__ for fn in MIGRATIONS]
        assert (
            [s.id for s in new.list(monitor="sae")]
            == ["0" * 32]
            == [s.id for s in new.list(monitor="shadow")]
        )
        assert new.get("0" * 32) == errored  # seed None, like the record written


def test_write_from_other_threads_is_read_here(store: LogStore):
    ids: list[str] = []
    threads = [
        threading.Thread(target=lambda i=i: ids.append(store.write(make_record(created=float(i)))))
        for i in range(4)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(s.id for s in store.list()) == sorted(ids)
    assert {store.get(i).created for i in ids} == {0.0, 1.0, 2.0, 3.0}


def test_writes_and_labels_are_visible_to_another_store_when_they_return(
    store: LogStore, target: str
):
    with LogStore(target) as reader:
        assert reader.count() == 0
        log_id = store.write(make_record())
        assert reader.get(log_id) == make_record()
        store.label(log_id, "unsure", reviewer="ann")
        assert reader.list()[0].label == "unsure"
        reader.label(log_id, "true_positive", reviewer="bob")
        assert [x.reviewer for x in store.labels(log_id)] == ["ann", "bob"]


def test_sqlite_is_wal_with_synchronous_full(tmp_path: Path):
    with LogStore(tmp_path / "g.db") as store:
        store.write(make_record())
        with store._engine.connect() as db:
            assert db.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            assert db.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    db = sqlite3.connect(tmp_path / "g.db")
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert db.execute("SELECT count(*) FROM generations").fetchone() == (1,)


@pytest.mark.parametrize(
    "target, scheme",
    [
        ("sqlite:////abs/g.db", "sqlite"),
        ("postgresql://u@h:5432/d", "postgresql+psycopg"),
        ("postgres://u:pw@h/d", "postgresql+psycopg"),
        ("postgresql+psycopg://u@h/d", "postgresql+psycopg"),
    ],
)
def test_targets_parse(target: str, scheme: str):
    from guard.logstore.connect import parse_target

    assert parse_target(target).drivername == scheme


@pytest.mark.parametrize("bad", ["mysql://u@h/d", "sqlite://", "sqlite:///:memory:"])
def test_bad_urls_are_refused(bad: str):
    with pytest.raises(InvalidRequestError) as info:
        LogStore(bad)
    assert info.value.param == "url"


def test_postgres_errors_name_the_database_without_its_password(pg_url):
    url = pg_url().replace(
        "guard@", "guard:secret@"
    )  # trust auth: the password is accepted and unused
    with LogStore(url) as store, pytest.raises(NotFoundError) as info:
        store.get("nope")
    assert store.path is None and store.dialect == "postgresql"
    assert "guard:***@127.0.0.1" in str(info.value) and "secret" not in str(info.value)
