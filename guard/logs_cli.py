"""``guard logs list|show|label|export|purge``: read, review and prune the flagged-generation log.

:func:`add_cli` registers the ``logs`` subcommand on the main parser's subparsers; each leaf sets
``func`` to a function taking the parsed namespace (and optionally an output stream) and returning
an exit code. Library errors (:class:`~guard.errors.GuardError`) propagate to the caller, which
prints them. The log is ``--db PATH`` (SQLite), ``--url URL`` (SQLite or Postgres), the one named
by ``--policy FILE``, else ``$GUARD_LOG_URL``, else ``./guard.db``; a missing SQLite file is an
error, never created. Run as ``guard logs list --db guard.db`` (:mod:`guard.cli`).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from guard.controller.record import DiscardedSpan, GenerationRecord
from guard.errors import InvalidRequestError
from guard.logstore import LABELS, UNLABELLED, LogStore
from guard.logstore.connect import is_url, parse_target
from guard.policy import load_policy

DEFAULT_DB = Path("guard.db")
URL_ENV = "GUARD_LOG_URL"
_AGO = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``logs list|show|label|export|purge`` to ``subparsers``; return the ``logs`` parser."""
    logs = subparsers.add_parser("logs", help="read, label and prune the flagged-generation log")
    sub = logs.add_subparsers(
        dest="logs_command", required=True, metavar="{list,show,label,export,purge}"
    )

    ls = sub.add_parser("list", help="list logged generations, newest first")
    _add_source(ls)
    _add_filters(ls)
    ls.add_argument("--limit", type=int, default=50, help="most rows to show (default 50)")
    ls.add_argument("--offset", type=int, default=0, help="skip this many rows first (paging)")
    ls.set_defaults(func=cmd_list)

    show = sub.add_parser(
        "show", help="show one generation: conversation, answer, discarded spans, labels"
    )
    _add_source(show)
    show.add_argument("id", help="log id (a unique prefix is enough)")
    show.add_argument(
        "--json", action="store_true", help="print the whole record (and its labels) as JSON"
    )
    show.set_defaults(func=cmd_show)

    label = sub.add_parser(
        "label", help="record a reviewer's verdict on a generation (history is kept)"
    )
    _add_source(label)
    label.add_argument("id", help="log id (a unique prefix is enough)")
    label.add_argument(
        "--label", required=True, choices=LABELS, help="the verdict on the monitor's firing"
    )
    label.add_argument("--note", default="", help="free text kept with the label")
    label.add_argument("--reviewer", default=None, help="who labels (default: $USER)")
    label.set_defaults(func=cmd_label)

    export = sub.add_parser(
        "export", help="write labelled generations as JSONL probe-training rows"
    )
    _add_source(export)
    export.add_argument(
        "--labelled",
        action="store_true",
        required=True,
        help="export the records labelled true_positive or false_positive (guard.loop)",
    )
    _add_filters(export, outcome=False, label=False)
    export.add_argument(
        "--scope",
        choices=["output", "prompt"],
        default="output",
        help="rows for an output-scope probe (spans, answers) or a prompt-scope one",
    )
    export.add_argument(
        "--out", type=Path, default=None, help="JSONL file to write (default: stdout)"
    )
    export.set_defaults(func=cmd_export)

    purge = sub.add_parser("purge", help="delete old generations (with their spans and labels)")
    _add_source(purge)
    purge.add_argument(
        "--older-than",
        type=_days,
        required=True,
        metavar="DAYS",
        help="delete records created more than DAYS days ago",
    )
    purge.add_argument("--yes", action="store_true", help="really delete (without it: only count)")
    purge.set_defaults(func=cmd_purge)
    return logs


def _add_source(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument(
        "--db", type=Path, help=f"SQLite log database (default: ${URL_ENV}, else ./{DEFAULT_DB})"
    )
    src.add_argument(
        "--url", help="log database URL: postgresql://USER@HOST:PORT/DB or sqlite:///PATH"
    )
    src.add_argument(
        "--policy", type=Path, metavar="FILE", help="read the log named by this policy file"
    )


def _add_filters(parser: argparse.ArgumentParser, outcome: bool = True, label: bool = True) -> None:
    parser.add_argument("--policy-name", help="only generations served under this policy name")
    parser.add_argument("--monitor", help="only generations where this monitor fired")
    if outcome:
        parser.add_argument(
            "--outcome",
            help="only this outcome",
            choices=["clean", "recovered", "refused", "cancelled", "interrupted", "error"],
        )
    parser.add_argument(
        "--since",
        type=parse_time,
        metavar="TIME",
        help="created at or after TIME: ISO date/time, epoch seconds, or an age (30m, 12h, 7d)",
    )
    parser.add_argument(
        "--until", type=parse_time, metavar="TIME", help="created before TIME (same forms)"
    )
    if label:
        parser.add_argument(
            "--label", choices=[*LABELS, UNLABELLED], help="only records whose label is this"
        )


def parse_time(text: str, now: float | None = None) -> float:
    """Epoch seconds from ``text``: an age (``30m``, ``12h``, ``7d``, ``2w``: that long before
    ``now``), epoch seconds, or an ISO 8601 date or date-time (local time unless it has an offset)."""
    text = text.strip()
    age = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", text)
    if age:
        return (time.time() if now is None else now) - float(age[1]) * _AGO[age[2]]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: give an ISO date/time (2026-11-20, "
            "2026-11-20T09:30), epoch seconds, or an age (30m, 12h, 7d)"
        ) from None


def _days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        days = -1.0
    if not days > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of days")
    return days


def log_target(args: argparse.Namespace) -> str:
    """The log ``args`` name: ``--db``, ``--url``, ``--policy``, ``$GUARD_LOG_URL``, else ./guard.db."""
    if getattr(args, "db", None) is not None:
        return str(args.db)
    if getattr(args, "url", None):
        return args.url
    if getattr(args, "policy", None) is not None:
        return load_policy(args.policy, check_paths=False).log.target(os.environ)
    return os.environ.get(URL_ENV, "").strip() or str(DEFAULT_DB)


def open_store(args: argparse.Namespace) -> LogStore:
    """The store named by ``args`` (see :func:`log_target`); never creates a SQLite file."""
    target = log_target(args)
    url = parse_target(target)
    if url.get_backend_name() == "sqlite" and not (url.database and Path(url.database).exists()):
        shown = url.database if is_url(target) else target
        raise InvalidRequestError(
            f"no log database at {shown}; pass --db PATH, --url URL or --policy FILE "
            f"(or set {URL_ENV})",
            param="db",
        )
    return LogStore.open(target)


def _filters(args: argparse.Namespace) -> dict:
    keys = {
        "policy_name": "policy",
        "monitor": "monitor",
        "outcome": "outcome",
        "since": "since",
        "until": "until",
        "label": "label",
    }
    return {name: getattr(args, key) for key, name in keys.items() if hasattr(args, key)}


def cmd_list(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    filters = _filters(args)
    with open_store(args) as store:
        rows = store.list(limit=args.limit, offset=args.offset, **filters)
        total = store.count(**filters) if len(rows) == args.limit or args.offset else len(rows)
    table = [("ID", "TIME", "POLICY", "OUTCOME", "RESETS", "MONITORS", "LABEL", "TEXT")]
    for r in rows:
        table.append(
            (
                r.id,
                _time(r.created),
                r.policy_name,
                r.outcome,
                str(r.resets),
                ",".join(r.monitors_fired) or "-",
                r.label or "-",
                _oneline(r.preview, 60),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1],
            file=out,
        )
    if not rows:
        print("(no records)", file=out)
    elif total > args.offset + len(rows) or args.offset:
        print(
            f"(rows {args.offset + 1}-{args.offset + len(rows)} of {total}; --offset N for more)",
            file=out,
        )
    return 0


def cmd_show(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    with open_store(args) as store:
        log_id = store.resolve_id(args.id)
        record = store.get(log_id)
        labels = store.labels(log_id)
    if args.json:
        data = {"id": log_id, **record.to_dict(), "labels": [vars(x) for x in labels]}
        print(json.dumps(data, indent=2, ensure_ascii=False), file=out)
    else:
        out.write(format_record(log_id, record))
        out.write("\n== labels (oldest first; the last is the record's label) ==\n")
        for x in labels:
            out.write(
                f"{_time(x.created)}  {x.label}  by {x.reviewer}"
                + (f": {x.note}" if x.note else "")
                + "\n"
            )
        if not labels:
            out.write(f"(unlabelled: guard logs label {log_id[:12]} --label {'|'.join(LABELS)})\n")
    return 0


def cmd_label(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    reviewer = (
        args.reviewer if args.reviewer is not None else os.environ.get("USER") or getpass.getuser()
    )
    with open_store(args) as store:
        log_id = store.resolve_id(args.id)
        made = store.label(log_id, args.label, reviewer=reviewer, note=args.note)
        history = len(store.labels(log_id))
    print(
        f"labelled {log_id} {made.label} (by {made.reviewer}; label {history} of this record)",
        file=out,
    )
    return 0


def cmd_export(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from guard.loop import export_labelled, write_jsonl

    filters = {
        k: v for k, v in _filters(args).items() if k in ("policy", "monitor", "since", "until")
    }
    with open_store(args) as store:
        rows = export_labelled(store, scope=args.scope, **filters)
    n = write_jsonl(rows, args.out if args.out is not None else (out or sys.stdout))
    if args.out is not None:
        print(f"wrote {n} rows to {args.out}", file=out or sys.stdout)
    return 0


def cmd_purge(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    cutoff = time.time() - args.older_than * 86400
    with open_store(args) as store:
        if not args.yes:
            n = store.count(until=cutoff)
            print(
                f"would delete {n} records created before {_time(cutoff)} from {store.where}; "
                "pass --yes to delete them",
                file=out,
            )
            return 0
        n = store.purge(before=cutoff)
    print(f"deleted {n} records created before {_time(cutoff)}", file=out)
    return 0


def format_record(log_id: str, record: GenerationRecord) -> str:
    """The human-readable view of one record."""
    lines = [
        f"log {log_id}  {_time(record.created)}",
        (
            f"policy {record.policy_name} (sha256 {record.policy_hash[:12]})  model {record.model}  "
            f"request {record.request_id}"
        ),
        (
            f"outcome {record.outcome}  finish {record.finish_reason}  resets {len(record.spans)}  "
            f"tokens: prompt {record.prompt_tokens}, answer {len(record.output_ids)}, sampled {record.sampled_tokens}"
        ),
        "",
        "== conversation ==",
    ]
    if record.messages is not None:
        lines += [f"[{m.get('role', '?')}] {m.get('content', '')}" for m in record.messages]
    else:
        lines.append(record.prompt or "")
    if record.deliberation is not None:
        lines += [
            "",
            (
                f"== reasoning ({record.deliberation}; {len(record.reasoning_ids)} tokens, "
                f"{record.reasoning_forced_tokens} forced; never sent to the client) =="
            ),
            record.reasoning,
        ]
    lines += ["", "== final answer ==", record.final_text]
    for i, span in enumerate(record.spans):
        lines += ["", *_format_span(i, span)]
    if record.firings:
        lines += ["", "== firings (in order; action shadow: logged only, changed nothing) =="]
        lines += [
            f"{f.monitor}: {f.scope} token {f.position} {f.token!r}, score {f.score:.3f} > "
            f"{_threshold(f.threshold)}, action {f.action}, attempt {f.attempt}"
            for f in record.firings
        ]
    if record.prompt_scores:
        lines.append(
            "prompt scores (max): "
            + ", ".join(f"{m} {max(v):.3f}" for m, v in record.prompt_scores.items() if v)
        )
    if record.monitor_errors:
        lines += ["", "== monitor errors =="]
        lines += [
            f"{e.monitor} ({e.scope}, token {e.position}): {e.error} -> {e.handling}"
            for e in record.monitor_errors
        ]
    if record.retries:
        lines += ["", "== retries =="]
        for r in record.retries:
            steer = ""
            if r.steer:
                steer = f", steer {r.steer.monitor} at layer {r.steer.layer} alpha {r.steer.alpha}"
            lines.append(
                f"retry {r.retry}: seed {r.seed}, temperature {r.temperature}, top_p {r.top_p}, "
                f"banned first tokens {r.banned_first_tokens or '-'}{steer}"
            )
    return "\n".join(lines) + "\n"


def _threshold(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


def _format_span(i: int, span: DiscardedSpan) -> list[str]:
    end = span.start + len(span.token_ids)
    lines = [
        f"== discarded span {i + 1} (attempt {span.attempt}, output tokens {span.start}..{end - 1}) ==",
        (
            f"monitor {span.monitor} fired at token {span.fired_at} {span.fired_token!r} (id {span.fired_token_id}),"
            f" threshold {span.threshold:g}"
        ),
    ]
    if span.retracted_chars:
        lines.append(f"retracted {span.retracted_chars} characters already sent to the client")
    monitors = list(span.scores)
    lines.append(
        f"{'pos':>6}  {'id':>7}  {'token':<18}"
        + "".join(f"  {m + ' raw/agg':>24}" for m in monitors)
    )
    for k, (tid, tok) in enumerate(zip(span.token_ids, span.tokens, strict=True)):
        pos = span.start + k
        cells = "".join(
            f"  {_score(span.scores[m], k) + ' / ' + _score(span.aggregated.get(m, []), k):>24}"
            for m in monitors
        )
        mark = "  <- fired" if pos == span.fired_at else ""
        lines.append(f"{pos:>6}  {tid:>7}  {_oneline(repr(tok), 18):<18}{cells}{mark}")
    return lines


def _score(scores: list[float], k: int) -> str:
    return f"{scores[k]:.3f}" if k < len(scores) else "-"


def _time(ts: float) -> str:
    return (
        datetime.fromtimestamp(ts, tz=timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    )  # local time


def _oneline(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."
