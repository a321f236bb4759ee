"""``guard logs list`` and ``guard logs show``: read the flagged-generation log.

:func:`add_cli` registers the ``logs`` subcommand on the main parser's subparsers; each leaf sets
``func`` to a function taking the parsed namespace and returning an exit code. Library errors
(:class:`~guard.errors.GuardError`) propagate to the caller, which prints them.
Run as ``guard logs list --db guard.db`` (:mod:`guard.cli`).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import TextIO

from guard.controller.record import DiscardedSpan, GenerationRecord
from guard.errors import InvalidRequestError
from guard.logstore import LogStore

DEFAULT_DB = Path("guard.db")


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``logs list`` and ``logs show`` to ``subparsers``; return the ``logs`` parser."""
    logs = subparsers.add_parser("logs", help="read the flagged-generation log")
    sub = logs.add_subparsers(dest="logs_command", required=True, metavar="{list,show}")

    ls = sub.add_parser("list", help="list logged generations, newest first")
    _add_source(ls)
    ls.add_argument("--limit", type=int, default=50, help="most rows to show (default 50)")
    ls.add_argument("--outcome", choices=["clean", "recovered", "refused"], help="only this outcome")
    ls.add_argument("--policy-name", help="only generations served under this policy name")
    ls.add_argument("--monitor", help="only generations where this monitor fired")
    ls.set_defaults(func=cmd_list)

    show = sub.add_parser("show", help="show one generation: conversation, answer, discarded spans")
    _add_source(show)
    show.add_argument("id", help="log id (a unique prefix is enough)")
    show.add_argument("--json", action="store_true", help="print the whole record as JSON")
    show.set_defaults(func=cmd_show)
    return logs


def _add_source(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--db", type=Path, help=f"log database (default ./{DEFAULT_DB})")
    src.add_argument("--policy", type=Path, metavar="FILE", help="read the log named by this policy file")


def open_store(args: argparse.Namespace) -> LogStore:
    """The store named by ``--db`` or ``--policy`` (default ./guard.db); never creates a database."""
    if getattr(args, "policy", None) is not None:
        from guard.policy import load_policy

        path = load_policy(args.policy, check_paths=False).log.path
    else:
        path = args.db if getattr(args, "db", None) is not None else DEFAULT_DB
    if not Path(path).exists():
        raise InvalidRequestError(f"no log database at {path}; pass --db PATH or --policy FILE", param="db")
    return LogStore(path)


def cmd_list(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    with open_store(args) as store:
        rows = store.list(limit=args.limit, policy=args.policy_name, outcome=args.outcome, monitor=args.monitor)
    table = [("ID", "TIME", "POLICY", "OUTCOME", "RESETS", "MONITORS", "TEXT")]
    for r in rows:
        table.append((r.id, _time(r.created), r.policy_name, r.outcome, str(r.resets),
                      ",".join(r.monitors_fired) or "-", _oneline(r.preview, 60)))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1], file=out)
    if not rows:
        print("(no records)", file=out)
    return 0


def cmd_show(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    with open_store(args) as store:
        log_id = store.resolve_id(args.id)
        record = store.get(log_id)
    if args.json:
        print(json.dumps({"id": log_id, **record.to_dict()}, indent=2, ensure_ascii=False), file=out)
    else:
        out.write(format_record(log_id, record))
    return 0


def format_record(log_id: str, record: GenerationRecord) -> str:
    """The human-readable view of one record."""
    lines = [
        f"log {log_id}  {_time(record.created)}",
        f"policy {record.policy_name} (sha256 {record.policy_hash[:12]})  model {record.model}  "
        f"request {record.request_id}",
        f"outcome {record.outcome}  finish {record.finish_reason}  resets {len(record.spans)}  "
        f"tokens: prompt {record.prompt_tokens}, answer {len(record.output_ids)}, sampled {record.sampled_tokens}",
        "", "== conversation ==",
    ]
    if record.messages is not None:
        lines += [f"[{m.get('role', '?')}] {m.get('content', '')}" for m in record.messages]
    else:
        lines.append(record.prompt or "")
    if record.deliberation is not None:
        lines += ["", f"== reasoning ({record.deliberation}; {len(record.reasoning_ids)} tokens, "
                      f"{record.reasoning_forced_tokens} forced; never sent to the client) ==", record.reasoning]
    lines += ["", "== final answer ==", record.final_text]
    for i, span in enumerate(record.spans):
        lines += ["", *_format_span(i, span)]
    if record.firings:
        lines += ["", "== firings (in order; action log = shadow monitor, changed nothing) =="]
        lines += [f"{f['monitor']}: {f.get('scope', 'output')} token {f['position']} {f['token']!r}, score "
                  f"{f['score']:.3f} > {f['threshold']:g}, action {f['action']}, attempt {f['attempt']}"
                  for f in record.firings]
    if record.prompt_scores:
        lines.append("prompt scores (max): " + ", ".join(f"{m} {max(v):.3f}" for m, v in record.prompt_scores.items() if v))
    if record.monitor_errors:
        lines += ["", "== monitor errors =="]
        lines += [f"{e['monitor']} ({e['scope']}, token {e['position']}): {e['error']} -> {e['handling']}"
                  for e in record.monitor_errors]
    if record.retries:
        lines += ["", "== retries =="]
        for r in record.retries:
            steer = ""
            if r.steer:
                steer = f", steer {r.steer['monitor']} at layer {r.steer['layer']} alpha {r.steer['alpha']}"
            lines.append(f"retry {r.retry}: seed {r.seed}, temperature {r.temperature}, top_p {r.top_p}, "
                         f"banned first tokens {r.banned_first_tokens or '-'}{steer}")
    return "\n".join(lines) + "\n"


def _format_span(i: int, span: DiscardedSpan) -> list[str]:
    end = span.start + len(span.token_ids)
    lines = [f"== discarded span {i + 1} (attempt {span.attempt}, output tokens {span.start}..{end - 1}) ==",
             f"monitor {span.monitor} fired at token {span.fired_at} {span.fired_token!r} (id {span.fired_token_id}),"
             f" threshold {span.threshold:g}"]
    if span.retracted_chars:
        lines.append(f"retracted {span.retracted_chars} characters already sent to the client")
    monitors = list(span.scores)
    lines.append(f"{'pos':>6}  {'id':>7}  {'token':<18}" + "".join(f"  {m + ' raw/agg':>24}" for m in monitors))
    for k, (tid, tok) in enumerate(zip(span.token_ids, span.tokens)):
        pos = span.start + k
        cells = "".join(f"  {_score(span.scores[m], k) + ' / ' + _score(span.aggregated.get(m, []), k):>24}"
                        for m in monitors)
        mark = "  <- fired" if pos == span.fired_at else ""
        lines.append(f"{pos:>6}  {tid:>7}  {_oneline(repr(tok), 18):<18}{cells}{mark}")
    return lines


def _score(scores: list[float], k: int) -> str:
    return f"{scores[k]:.3f}" if k < len(scores) else "-"


def _time(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _oneline(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."
