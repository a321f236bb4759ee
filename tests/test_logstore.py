"""The log store: exact round trips, filters, migrations, threads, durability, and the CLI views."""

from __future__ import annotations

import argparse
import io
import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from guard.controller.record import DiscardedSpan, GenerationRecord, RetryStrategy
from guard.errors import InvalidRequestError, NotFoundError
from guard.logs_cli import add_cli, cmd_list, cmd_show
from guard.logstore import MIGRATIONS, LogStore


@pytest.fixture
def store(tmp_path: Path):
    with LogStore(tmp_path / "sub" / "guard.db") as s:
        yield s


def make_record(created: float = 1_700_000_000.123456, policy: str = "demo", outcome: str = "recovered",
                monitor: str = "harm-probe", spans: int = 1, text: str = "Here is a safe answer.") -> GenerationRecord:
    record = GenerationRecord(
        request_id=f"req-{created}", policy_name=policy, policy_hash="ab" * 32, model="organism",
        messages=[{"role": "system", "content": "be nice"}, {"role": "user", "content": "how do I é?"}],
        prompt=None, prompt_tokens=17, created=created, output_ids=[5, 6, 7], final_text=text,
        outcome=outcome, finish_reason="stop", sampled_tokens=3 + 4 * spans,
        final_scores={monitor: [0.1, 0.2, 1 / 3]}, monitors_fired=[monitor] if spans else [])
    for i in range(spans):
        record.spans.append(DiscardedSpan(
            attempt=i, start=2, token_ids=[11, 12, 13, 14], text=" Sure, mix", tokens=[" Sure", ",", " mix", "\n"],
            scores={monitor: [0.1, 0.7, 0.95, 0.30000000000000004], "other": [0.0, 0.0, 0.0]},
            aggregated={monitor: [0.1, 0.4, 0.675, 0.4875]}, monitor=monitor, threshold=0.6, fired_at=4,
            fired_token_id=13, fired_token=" mix", retracted_chars=i))
        record.retries.append(RetryStrategy(retry=i + 1, seed=1234 + i, temperature=0.7, top_p=0.9,
                                            banned_first_tokens=[11],
                                            steer={"monitor": monitor, "layer": 6, "alpha": 4.0} if i else None))
    return record


def test_write_get_round_trip_is_exact(store: LogStore):
    for record in (make_record(), make_record(spans=0, outcome="clean"), make_record(spans=3, outcome="refused")):
        assert store.get(store.write(record)) == record


def test_completion_records_round_trip(store: LogStore):
    record = make_record()
    record.messages, record.prompt, record.finish_reason = None, "Once upon", None
    assert store.get(store.write(record)) == record


def test_spans_are_stored_one_row_each(store: LogStore):
    log_id = store.write(make_record(spans=3))
    db = sqlite3.connect(store.path)
    rows = db.execute("SELECT idx, monitor, scores FROM spans WHERE generation_id = ? ORDER BY idx",
                      (log_id,)).fetchall()
    assert [r[0] for r in rows] == [0, 1, 2]
    assert json.loads(rows[0][2])["harm-probe"][2] == 0.95
    assert db.execute("SELECT resets FROM generations WHERE id = ?", (log_id,)).fetchone() == (3,)


def test_get_unknown_id_raises_not_found(store: LogStore):
    with pytest.raises(NotFoundError, match="no log record"):
        store.get("nope")


def test_ids_sort_by_write_time_and_resolve_by_prefix(store: LogStore):
    a, b = store.write(make_record()), store.write(make_record())
    assert len(a) == 32 and a[:12] <= b[:12]
    assert store.resolve_id(a[:20]) == a
    with pytest.raises(InvalidRequestError, match="ambiguous"):
        store.resolve_id("")
    with pytest.raises(NotFoundError):
        store.resolve_id("zz")


def test_list_filters_and_orders_newest_first(store: LogStore):
    ids = {
        "old": store.write(make_record(created=100.0, policy="demo", outcome="recovered", monitor="harm-probe")),
        "mid": store.write(make_record(created=200.0, policy="other", outcome="refused", monitor="reset-token")),
        "new": store.write(make_record(created=300.0, policy="demo", outcome="clean", spans=0)),
    }
    assert [s.id for s in store.list()] == [ids["new"], ids["mid"], ids["old"]]
    assert [s.id for s in store.list(limit=1)] == [ids["new"]]
    assert [s.id for s in store.list(policy="demo")] == [ids["new"], ids["old"]]
    assert [s.id for s in store.list(outcome="refused")] == [ids["mid"]]
    assert [s.id for s in store.list(monitor="harm-probe")] == [ids["old"]]
    assert [s.id for s in store.list(since=200.0)] == [ids["new"], ids["mid"]]
    assert store.list(policy="demo", outcome="refused") == []
    summary = store.list(outcome="refused")[0]
    assert (summary.resets, summary.monitors_fired, summary.preview) == (1, ["reset-token"], "Here is a safe answer.")


def test_migrations_are_recorded_and_idempotent_on_reopen(tmp_path: Path):
    path = tmp_path / "guard.db"
    with LogStore(path) as first:
        log_id = first.write(make_record())
        assert first.migrations() == [fn.__name__ for fn in MIGRATIONS]
    with LogStore(path) as again:
        assert again.migrations() == [fn.__name__ for fn in MIGRATIONS]
        assert again.get(log_id) == make_record()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_write_from_another_thread_is_read_here(store: LogStore):
    ids: list[str] = []
    threads = [threading.Thread(target=lambda i=i: ids.append(store.write(make_record(created=float(i)))))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(s.id for s in store.list()) == sorted(ids)
    assert {store.get(i).created for i in ids} == {0.0, 1.0, 2.0, 3.0}


def test_record_is_visible_to_another_connection_when_write_returns(store: LogStore):
    reader = sqlite3.connect(store.path)
    log_id = store.write(make_record())
    assert reader.execute("SELECT final_text FROM generations WHERE id = ?", (log_id,)).fetchone() == (
        "Here is a safe answer.",)
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


# -- CLI ----------------------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="guard")
    add_cli(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


def test_cli_list_prints_a_table(store: LogStore):
    long_text = "word " * 40
    log_id = store.write(make_record(text=long_text))
    store.write(make_record(created=1.0, policy="other", outcome="refused"))
    out = io.StringIO()
    args = parse("logs", "list", "--db", str(store.path), "--policy-name", "demo")
    assert args.func is cmd_list and args.func(args, out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["ID", "TIME", "POLICY", "OUTCOME", "RESETS", "MONITORS", "TEXT"]
    assert len(lines) == 2 and lines[1].startswith(log_id)
    assert "demo" in lines[1] and "recovered" in lines[1] and "harm-probe" in lines[1]
    assert lines[1].endswith(("word " * 12)[:57] + "...")


def test_cli_show_prints_spans_token_by_token(store: LogStore):
    log_id = store.write(make_record(spans=2))
    out = io.StringIO()
    args = parse("logs", "show", log_id[:16], "--db", str(store.path))
    assert args.func is cmd_show and args.func(args, out) == 0
    text = out.getvalue()
    assert "[user] how do I é?" in text and "== final answer ==\nHere is a safe answer." in text
    assert "monitor harm-probe fired at token 4 ' mix' (id 13), threshold 0.6" in text
    fired = [line for line in text.splitlines() if line.endswith("<- fired")]
    assert len(fired) == 2 and "0.950 / 0.675" in fired[0]
    assert ("retry 2: seed 1235, temperature 0.7, top_p 0.9, banned first tokens [11], "
            "steer harm-probe at layer 6 alpha 4.0") in text


def test_cli_show_json_is_the_record(store: LogStore):
    record = make_record()
    log_id = store.write(record)
    out = io.StringIO()
    args = parse("logs", "show", log_id, "--db", str(store.path), "--json")
    args.func(args, out)
    data = json.loads(out.getvalue())
    assert data.pop("id") == log_id
    assert GenerationRecord.from_dict(data) == record


def test_cli_reads_the_log_named_by_a_policy(tmp_path: Path):
    (tmp_path / "policy.yaml").write_text("name: p\nmodel: {path: ./model}\nlog: {path: logs/p.db}\n")
    with LogStore(tmp_path / "logs" / "p.db") as s:
        log_id = s.write(make_record())
    out = io.StringIO()
    args = parse("logs", "list", "--policy", str(tmp_path / "policy.yaml"))
    args.func(args, out)
    assert log_id in out.getvalue()


def test_cli_refuses_to_create_a_missing_database(tmp_path: Path):
    args = parse("logs", "list", "--db", str(tmp_path / "none.db"))
    with pytest.raises(InvalidRequestError, match="pass --db PATH or --policy FILE"):
        args.func(args, io.StringIO())
    assert not (tmp_path / "none.db").exists()


def test_module_entry_point(store: LogStore):
    log_id = store.write(make_record())
    run = subprocess.run([sys.executable, "-m", "guard.cli", "logs", "show", "nope", "--db", str(store.path)],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "no log record with id 'nope'" in run.stderr
    run = subprocess.run([sys.executable, "-m", "guard.cli", "logs", "list", "--db", str(store.path)],
                         capture_output=True, text=True, check=True)
    assert log_id in run.stdout


def test_cli_show_prints_firings_and_monitor_errors(store: LogStore):
    rec = make_record(spans=1)
    rec.firings = [{"monitor": "shadow-probe", "action": "log", "scope": "output", "position": 3, "token_id": 9,
                    "token": " x", "score": 0.81, "threshold": 0.5, "attempt": 0}]
    rec.prompt_scores = {"risk-probe": [0.1, 0.7, 0.2]}
    rec.monitor_errors = [{"monitor": "sae", "scope": "output", "error": "ValueError: boom", "position": 2,
                           "attempt": 0, "handling": "disabled"}]
    log_id = store.write(rec)
    out = io.StringIO()
    args = parse("logs", "show", log_id, "--db", str(store.path))
    assert args.func(args, out) == 0
    text = out.getvalue()
    assert "shadow-probe: output token 3 ' x', score 0.810 > 0.5, action log, attempt 0" in text
    assert "prompt scores (max): risk-probe 0.700" in text
    assert "sae (output, token 2): ValueError: boom -> disabled" in text
