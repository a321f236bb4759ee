"""``guard logs``: list/show/label/export/purge end to end on SQLite, list/label on Postgres via --url."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from test_logstore import make_record

from guard.controller.record import Firing, GenerationRecord, MonitorError
from guard.errors import InvalidRequestError, NotFoundError
from guard.logs_cli import add_cli, cmd_export, cmd_label, cmd_list, cmd_purge, cmd_show, parse_time
from guard.logstore import LogStore


@pytest.fixture
def store(tmp_path: Path):
    with LogStore(tmp_path / "sub" / "guard.db") as s:
        yield s


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="guard")
    add_cli(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


def run(*argv: str) -> str:
    out = io.StringIO()
    args = parse("logs", *argv)
    assert args.func(args, out) == 0
    return out.getvalue()


def test_cli_list_prints_a_table(store: LogStore):
    long_text = "word " * 40
    log_id = store.write(make_record(text=long_text))
    store.write(make_record(created=1.0, policy="other", outcome="refused"))
    store.label(log_id, "false_positive", reviewer="ann")
    args = parse("logs", "list", "--db", str(store.path), "--policy-name", "demo")
    assert args.func is cmd_list
    lines = run("list", "--db", str(store.path), "--policy-name", "demo").splitlines()
    assert lines[0].split() == [
        "ID",
        "TIME",
        "POLICY",
        "OUTCOME",
        "RESETS",
        "MONITORS",
        "LABEL",
        "TEXT",
    ]
    assert len(lines) == 2 and lines[1].startswith(log_id)
    assert "demo" in lines[1] and "recovered" in lines[1] and "harm-probe" in lines[1]
    assert "false_positive" in lines[1]
    assert lines[1].endswith(("word " * 12)[:57] + "...")


def test_cli_list_filters_and_pages(store: LogStore):
    # Local wall-clock days, as the CLI reads a date without an offset.
    ids = [
        store.write(make_record(created=datetime(2026, 11, d).timestamp(), monitor=m, outcome=o))  # noqa: DTZ001
        for d, m, o in (
            (1, "harm-probe", "recovered"),
            (2, "reset-token", "refused"),
            (3, "harm-probe", "refused"),
        )
    ]
    store.label(ids[2], "true_positive", reviewer="ann")

    def listed(*argv: str) -> list[str]:
        lines = run("list", "--db", str(store.path), *argv).splitlines()[1:]
        return [line.split()[0] for line in lines if not line.startswith("(")]

    assert listed("--monitor", "harm-probe") == [ids[2], ids[0]]
    assert listed("--outcome", "refused", "--monitor", "harm-probe") == [ids[2]]
    assert listed("--since", "2026-11-02", "--until", "2026-11-03") == [ids[1]]
    assert listed("--label", "unlabelled") == [ids[1], ids[0]]
    assert listed("--label", "true_positive") == [ids[2]]
    page = run("list", "--db", str(store.path), "--limit", "2", "--offset", "1")
    assert [line.split()[0] for line in page.splitlines()[1:3]] == [ids[1], ids[0]]
    assert page.splitlines()[-1] == "(rows 2-3 of 3; --offset N for more)"
    assert (
        run("list", "--db", str(store.path), "--label", "unsure").splitlines()[-1] == "(no records)"
    )


def test_parse_time_forms():
    assert parse_time("1700000000.5") == 1700000000.5
    assert parse_time("7d", now=1_000_000.0) == 1_000_000.0 - 7 * 86400
    assert parse_time("30m", now=1000.0) == -800.0
    assert parse_time("2026-11-20T09:30") == datetime(2026, 11, 20, 9, 30).timestamp()  # noqa: DTZ001 - local
    assert (
        parse_time("2026-11-20T09:30+00:00")
        == datetime.fromisoformat("2026-11-20T09:30+00:00").timestamp()
    )
    with pytest.raises(argparse.ArgumentTypeError, match="not a time"):
        parse_time("yesterday")
    with pytest.raises(SystemExit):
        parse("logs", "list", "--since", "yesterday")


def test_cli_show_prints_spans_token_by_token(store: LogStore):
    log_id = store.write(make_record(spans=2))
    args = parse("logs", "show", log_id[:16], "--db", str(store.path))
    assert args.func is cmd_show
    text = run("show", log_id[:16], "--db", str(store.path))
    assert "[user] how do I é?" in text and "== final answer ==\nHere is a safe answer." in text
    assert "monitor harm-probe fired at token 4 ' mix' (id 13), threshold 0.6" in text
    fired = [line for line in text.splitlines() if line.endswith("<- fired")]
    assert len(fired) == 2 and "0.950 / 0.675" in fired[0]
    assert (
        "retry 2: seed 1235, temperature 0.7, top_p 0.9, banned first tokens [11], "
        "steer harm-probe at layer 6 alpha 4.0"
    ) in text
    assert f"(unlabelled: guard logs label {log_id[:12]} --label" in text


def test_cli_show_json_is_the_record_and_its_labels(store: LogStore):
    record = make_record()
    log_id = store.write(record)
    store.label(log_id, "unsure", reviewer="ann", note="hm")
    data = json.loads(run("show", log_id, "--db", str(store.path), "--json"))
    assert data.pop("id") == log_id
    assert [(x["label"], x["reviewer"], x["note"], x["log_id"]) for x in data.pop("labels")] == [
        ("unsure", "ann", "hm", log_id)
    ]
    assert GenerationRecord.from_dict(data) == record


def test_cli_show_prints_firings_and_monitor_errors(store: LogStore):
    rec = make_record(spans=1)
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
    rec.prompt_scores = {"risk-probe": [0.1, 0.7, 0.2]}
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
    text = run("show", store.write(rec), "--db", str(store.path))
    assert "shadow-probe: output token 3 ' x', score 0.810 > 0.5, action log, attempt 0" in text
    assert "prompt scores (max): risk-probe 0.700" in text
    assert "sae (output, token 2): ValueError: boom -> disabled" in text


def test_cli_label_keeps_history_and_show_prints_it(
    store: LogStore, monkeypatch: pytest.MonkeyPatch
):
    log_id = store.write(make_record())
    monkeypatch.setenv("USER", "carol")
    args = parse("logs", "label", log_id[:14], "--db", str(store.path), "--label", "true_positive")
    assert args.func is cmd_label
    assert run("label", log_id[:14], "--db", str(store.path), "--label", "true_positive") == (
        f"labelled {log_id} true_positive (by carol; label 1 of this record)\n"
    )
    out = run(
        "label",
        log_id,
        "--db",
        str(store.path),
        "--label",
        "false_positive",
        "--note",
        "a recipe",
        "--reviewer",
        "dan",
    )
    assert out.endswith("(by dan; label 2 of this record)\n")
    assert [(x.label, x.reviewer, x.note) for x in store.labels(log_id)] == [
        ("true_positive", "carol", ""),
        ("false_positive", "dan", "a recipe"),
    ]
    text = run("show", log_id, "--db", str(store.path))
    history = text.split("== labels (oldest first; the last is the record's label) ==\n")[
        1
    ].splitlines()
    assert [line.split("  ", 1)[1] for line in history] == [
        "true_positive  by carol",
        "false_positive  by dan: a recipe",
    ]
    with pytest.raises(SystemExit):
        parse("logs", "label", log_id, "--db", str(store.path), "--label", "maybe")
    with pytest.raises(NotFoundError):
        run("label", "ffff", "--db", str(store.path), "--label", "unsure")


def test_cli_purge_counts_without_yes_and_deletes_with_it(store: LogStore):
    old = store.write(make_record(created=1_000.0))
    new = store.write(make_record(created=datetime.now(tz=timezone.utc).timestamp()))
    store.label(old, "unsure", reviewer="ann")
    args = parse("logs", "purge", "--db", str(store.path), "--older-than", "30")
    assert args.func is cmd_purge
    out = run("purge", "--db", str(store.path), "--older-than", "30")
    assert out.startswith("would delete 1 records created before ") and out.endswith(
        "pass --yes to delete them\n"
    )
    assert store.count() == 2
    assert run("purge", "--db", str(store.path), "--older-than", "30", "--yes").startswith(
        "deleted 1 records"
    )
    assert [s.id for s in store.list()] == [new]
    for bad in ("0", "-1", "x"):
        with pytest.raises(SystemExit):
            parse("logs", "purge", "--db", str(store.path), "--older-than", bad)
    with pytest.raises(SystemExit):
        parse("logs", "purge", "--db", str(store.path))


def test_cli_export_parses_filters_and_needs_labelled(tmp_path: Path):
    args = parse(
        "logs",
        "export",
        "--labelled",
        "--db",
        "x.db",
        "--policy-name",
        "demo",
        "--monitor",
        "m",
        "--since",
        "100",
        "--until",
        "200",
        "--out",
        str(tmp_path / "rows.jsonl"),
    )
    assert args.func is cmd_export
    assert (args.policy_name, args.monitor, args.since, args.until, args.scope, args.out) == (
        "demo",
        "m",
        100.0,
        200.0,
        "output",
        tmp_path / "rows.jsonl",
    )
    with pytest.raises(SystemExit):
        parse("logs", "export", "--db", "x.db")  # --labelled is required
    with pytest.raises(SystemExit):
        parse(
            "logs", "export", "--labelled", "--label", "unsure"
        )  # the labels are the export's business


def shadow_record(created: float) -> GenerationRecord:
    """A clean answer on which a log-only monitor fired: guard.loop exports the answer."""
    rec = make_record(created=created, spans=0, outcome="clean")
    rec.monitors_fired = ["shadow"]
    rec.firings = [
        Firing(
            monitor="shadow",
            action="log",
            scope="output",
            position=1,
            token_id=6,
            token=" x",
            score=0.8,
            threshold=0.5,
            attempt=0,
        )
    ]
    return rec


def test_cli_export_writes_what_guard_loop_exports(store: LogStore, tmp_path: Path):
    loop = pytest.importorskip("guard.loop")
    ids = [store.write(shadow_record(float(i + 1))) for i in range(3)]
    store.label(ids[0], "true_positive", reviewer="ann")
    store.label(ids[1], "false_positive", reviewer="ann")
    expected = loop.export_labelled(store)
    assert expected  # two labelled records give rows
    printed = run("export", "--labelled", "--db", str(store.path))
    assert [json.loads(line) for line in printed.splitlines()] == json.loads(json.dumps(expected))
    out = run(
        "export",
        "--labelled",
        "--db",
        str(store.path),
        "--until",
        "2",
        "--out",
        str(tmp_path / "r.jsonl"),
    )
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert rows == json.loads(json.dumps(loop.export_labelled(store, until=2.0))) and rows != []
    assert out == f"wrote {len(rows)} rows to {tmp_path / 'r.jsonl'}\n" and len(rows) < len(
        expected
    )


# -- where the log is -----------------------------------------------------------------------------


def test_cli_reads_the_log_named_by_a_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "policy.yaml").write_text(
        "name: p\nmodel: {path: ./model}\nlog: {path: logs/p.db}\n"
    )
    with LogStore(tmp_path / "logs" / "p.db") as s:
        log_id = s.write(make_record())
    assert log_id in run("list", "--policy", str(tmp_path / "policy.yaml"))
    (tmp_path / "env.yaml").write_text(
        "name: p\nmodel: {path: ./model}\nlog: {url_env: MY_LOG_URL}\n"
    )
    monkeypatch.setenv("MY_LOG_URL", f"sqlite:///{tmp_path / 'logs' / 'p.db'}")
    assert log_id in run("list", "--policy", str(tmp_path / "env.yaml"))


def test_cli_default_log_comes_from_guard_log_url(store: LogStore, monkeypatch: pytest.MonkeyPatch):
    log_id = store.write(make_record())
    monkeypatch.setenv("GUARD_LOG_URL", f"sqlite:///{store.path}")
    assert log_id in run("list")
    assert log_id in run("list", "--url", f"sqlite:///{store.path}")


def test_cli_refuses_to_create_a_missing_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("GUARD_LOG_URL", raising=False)
    for source in (
        ("--db", str(tmp_path / "none.db")),
        ("--url", f"sqlite:///{tmp_path / 'none.db'}"),
    ):
        with pytest.raises(InvalidRequestError, match="pass --db PATH, --url URL or --policy FILE"):
            run("list", *source)
    assert not (tmp_path / "none.db").exists()


def test_module_entry_point(store: LogStore):
    log_id = store.write(make_record())
    done = subprocess.run(
        [sys.executable, "-m", "guard.cli", "logs", "show", "nope", "--db", str(store.path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and "no log record with id 'nope'" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "guard.cli", "logs", "list", "--db", str(store.path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert log_id in done.stdout


def test_cli_list_and_label_on_postgres(pg_url):
    url = pg_url()
    with LogStore(url) as s:
        ids = [
            s.write(make_record(created=1.0, policy="demo")),
            s.write(make_record(created=2.0, policy="other")),
        ]
    assert run(
        "label", ids[0][:16], "--url", url, "--label", "false_positive", "--reviewer", "ann"
    ).startswith(f"labelled {ids[0]} false_positive")
    lines = run("list", "--url", url, "--label", "false_positive").splitlines()
    assert len(lines) == 2 and lines[1].startswith(ids[0]) and "false_positive" in lines[1]
    assert [line.split()[0] for line in run("list", "--url", url).splitlines()[1:]] == [
        ids[1],
        ids[0],
    ]
    done = subprocess.run(
        [sys.executable, "-m", "guard.cli", "logs", "show", ids[0], "--url", url],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "false_positive  by ann" in done.stdout
