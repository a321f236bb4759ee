"""`LogStore`: write, read, filter, label and purge generation records, on SQLite or Postgres.

Storage invariants (the schema itself: :mod:`guard.logstore.migrations`):

- ``generations`` holds one row per record; ``spans`` one row per discarded span, keyed by
  ``(generation_id, idx)`` with ``idx`` the span's position in ``GenerationRecord.spans``;
  ``generation_monitors`` one row per monitor that fired or condemned a span. Lists and dicts are
  JSON text, so :meth:`LogStore.get` returns a record equal to the one written, on both
  databases (floats round-trip exactly through ``json`` and float64 columns). Postgres text
  cannot hold NUL characters: there, a NUL in a text field is stored as U+FFFD.
- Log ids are 32 hex characters: 12 of milliseconds since the epoch, 20 random, so ids sort by
  write time.
- When :meth:`LogStore.write` or :meth:`LogStore.label` returns, the row is committed durably
  (SQLite: WAL with ``synchronous=FULL``; Postgres: a flushed commit) and visible to every other
  connection, process and replica.
- Labels are append-only: :meth:`LogStore.label` adds a row, and a record's label is its newest
  one. Only :meth:`LogStore.purge` deletes, a whole record at a time (spans, monitors, labels).
- A store is safe to share between threads: each call checks a connection out of the pool.
"""

from __future__ import annotations

import builtins
import json
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, and_, delete, exists, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from guard.controller.record import (
    DiscardedSpan,
    Firing,
    GenerationRecord,
    MonitorError,
    RetryStrategy,
)
from guard.errors import InvalidRequestError, NotFoundError
from guard.logstore import connect, migrations
from guard.logstore import tables as t

LABELS = ("true_positive", "false_positive", "unsure")
"""A reviewer's verdict on a flagged generation: the monitor was right, wrong, or it is unclear."""
UNLABELLED = "unlabelled"
"""The ``label`` filter value for records nobody has labelled."""

Time = float | int | datetime
"""Epoch seconds, or a datetime (a naive one is local time)."""


@dataclass(frozen=True)
class LogSummary:
    """One row of :meth:`LogStore.list`."""

    id: str
    created: float
    request_id: str
    policy_name: str
    policy_hash: str
    model: str
    outcome: str
    finish_reason: str | None
    resets: int
    monitors_fired: list[str]
    preview: str
    """The first 200 characters of the final text."""
    label: str | None = None
    """The newest label (one of :data:`LABELS`), ``None`` when unlabelled."""
    label_note: str | None = None
    """The newest label's note."""


@dataclass(frozen=True)
class Label:
    """One reviewer verdict on a record (a row of :meth:`LogStore.labels`)."""

    log_id: str
    label: str
    """One of :data:`LABELS`."""
    note: str
    reviewer: str
    created: float
    """Epoch seconds when it was stored."""


_SPAN_COLUMNS = (
    "attempt",
    "start",
    "monitor",
    "threshold",
    "fired_at",
    "fired_token_id",
    "fired_token",
    "retracted_chars",
    "text",
    "token_ids",
    "tokens",
    "scores",
    "aggregated",
)
_SPAN_JSON = {"token_ids", "tokens", "scores", "aggregated"}
_G = t.generations
_L = t.labels


def new_log_id(now: float | None = None) -> str:
    """A time-ordered id: 12 hex digits of epoch milliseconds, then 20 random hex digits."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ms:012x}{secrets.token_hex(10)}"


class LogStore:
    """Generation records in the database at ``target``: a SQLite path or a URL (see
    :func:`guard.logstore.connect.parse_target`). The database and its schema are created or
    migrated on open. Close with :meth:`close` or use as a context manager."""

    def __init__(self, target: str | Path):
        self.url = connect.parse_target(target)
        self.dialect = self.url.get_backend_name()
        self.path: Path | None = (
            Path(self.url.database) if self.dialect == "sqlite" and self.url.database else None
        )
        """The SQLite file; ``None`` on Postgres."""
        self.where = str(self.path) if self.path else self.url.render_as_string(hide_password=True)
        """Where the log is, for messages (no password)."""
        self._engine = connect.create(self.url)
        try:
            migrations.migrate(self._engine)
        except BaseException:
            self._engine.dispose()
            raise

    @classmethod
    def open(cls, target: str | Path) -> LogStore:
        """The store at ``target`` (a path or URL); the same as ``LogStore(target)``."""
        return cls(target)

    def migrations(self) -> list[str]:
        """Names of the migrations applied to this database, in order."""
        with self._tx() as db:
            return migrations.applied(db)

    @contextmanager
    def _tx(self, write: bool = False, snapshot: bool = False) -> Iterator[Connection]:
        """A transaction, committed on success; ``snapshot``: all reads see one point in time."""
        with self._engine.connect() as db:
            if write:
                connect.writing(db)
            if snapshot and self.dialect == "postgresql":
                db.execution_options(isolation_level="REPEATABLE READ")
            with db.begin():
                yield db

    def _text(self, value: Any) -> Any:
        if isinstance(value, str) and self.dialect == "postgresql":
            return value.replace("\x00", "\ufffd")
        return value

    # -- writing ------------------------------------------------------------------------------

    def write(self, record: GenerationRecord, log_id: str | None = None) -> str:
        """Store ``record`` durably and return its log id.

        With ``log_id`` (from :func:`new_log_id`), the record stored under that id, if any, is
        replaced whole (spans and monitors; labels are kept): how a checkpoint of a running
        generation is updated and finally completed."""
        log_id = log_id or new_log_id()
        spans = [self._span_row(log_id, i, span) for i, span in enumerate(record.spans)]
        monitors = sorted(set(record.monitors_fired) | {s.monitor for s in record.spans})
        row = self._generation_row(log_id, record)
        with self._tx(write=True) as db:
            if db.execute(select(_G.c.id).where(_G.c.id == log_id)).first() is None:
                db.execute(insert(_G), row)
            else:
                db.execute(
                    update(_G).where(_G.c.id == log_id), {k: v for k, v in row.items() if k != "id"}
                )
                db.execute(delete(t.spans).where(t.spans.c.generation_id == log_id))
                db.execute(
                    delete(t.generation_monitors).where(
                        t.generation_monitors.c.generation_id == log_id
                    )
                )
            if spans:
                db.execute(insert(t.spans), spans)
            if monitors:
                db.execute(
                    insert(t.generation_monitors),
                    [{"generation_id": log_id, "monitor": self._text(m)} for m in monitors],
                )
        return log_id

    def _generation_row(self, log_id: str, record: GenerationRecord) -> dict[str, Any]:
        row = {
            "id": log_id,
            "request_id": record.request_id,
            "created": record.created,
            "policy_name": record.policy_name,
            "policy_hash": record.policy_hash,
            "model": record.model,
            "messages": None if record.messages is None else json.dumps(record.messages),
            "prompt": record.prompt,
            "prompt_tokens": record.prompt_tokens,
            "output_ids": json.dumps(record.output_ids),
            "final_text": record.final_text,
            "outcome": record.outcome,
            "finish_reason": record.finish_reason,
            "resets": len(record.spans),
            "sampled_tokens": record.sampled_tokens,
            "monitors_fired": json.dumps(record.monitors_fired),
            "retries": _json_records(record.retries),
            "final_scores": json.dumps(record.final_scores),
            "firings": _json_records(record.firings),
            "prompt_scores": json.dumps(record.prompt_scores),
            "monitor_errors": _json_records(record.monitor_errors),
            "deliberation": record.deliberation,
            "reasoning": record.reasoning,
            "reasoning_ids": json.dumps(record.reasoning_ids),
            "reasoning_forced_tokens": record.reasoning_forced_tokens,
            "seed": record.seed,
            "complete": int(record.complete),
        }
        return {k: self._text(v) for k, v in row.items()}

    def _span_row(self, log_id: str, idx: int, span: DiscardedSpan) -> dict[str, Any]:
        data = asdict(span)
        return {
            "generation_id": log_id,
            "idx": idx,
            **{
                c: json.dumps(data[c]) if c in _SPAN_JSON else self._text(data[c])
                for c in _SPAN_COLUMNS
            },
        }

    def label(self, log_id: str, label: str, *, reviewer: str, note: str = "") -> Label:
        """Record ``reviewer``'s verdict ``label`` (one of :data:`LABELS`) on the record ``log_id``.

        Earlier labels are kept (:meth:`labels`); this one becomes the record's label.
        :class:`NotFoundError` for an unknown id, :class:`InvalidRequestError` for a label not in
        :data:`LABELS` or an empty reviewer.
        """
        if label not in LABELS:
            raise InvalidRequestError(
                f"label must be one of {', '.join(LABELS)}; got {label!r}", param="label"
            )
        if not reviewer.strip():
            raise InvalidRequestError("a label needs the reviewer's name", param="reviewer")
        made = Label(log_id, label, self._text(note), self._text(reviewer.strip()), time.time())
        try:
            with self._tx(write=True) as db:
                if db.execute(select(_G.c.id).where(_G.c.id == log_id)).first() is None:
                    raise self._not_found(log_id)
                db.execute(
                    insert(_L),
                    {
                        "generation_id": log_id,
                        "label": label,
                        "note": made.note,
                        "reviewer": made.reviewer,
                        "created": made.created,
                    },
                )
        except IntegrityError:  # purged between the check and the insert
            raise self._not_found(log_id) from None
        return made

    def purge(self, before: Time) -> int:
        """Delete every record created before ``before``, with its spans and labels; return how many."""
        cutoff = _epoch(before)
        old = select(_G.c.id).where(_G.c.created < cutoff)
        with self._tx(write=True) as db:
            for table in (t.spans, t.generation_monitors, _L):
                db.execute(delete(table).where(table.c.generation_id.in_(old)))
            return db.execute(delete(_G).where(_G.c.created < cutoff)).rowcount

    # -- reading ------------------------------------------------------------------------------

    def get(self, log_id: str) -> GenerationRecord:
        """The record stored under ``log_id``; :class:`NotFoundError` if there is none."""
        with self._tx(snapshot=True) as db:
            row = db.execute(select(_G).where(_G.c.id == log_id)).mappings().first()
            spans = (
                db.execute(
                    select(t.spans).where(t.spans.c.generation_id == log_id).order_by(t.spans.c.idx)
                )
                .mappings()
                .all()
            )
        if row is None:
            raise self._not_found(log_id)
        return GenerationRecord(
            request_id=row["request_id"],
            policy_name=row["policy_name"],
            policy_hash=row["policy_hash"],
            model=row["model"],
            messages=None if row["messages"] is None else json.loads(row["messages"]),
            prompt=row["prompt"],
            prompt_tokens=row["prompt_tokens"],
            created=row["created"],
            output_ids=json.loads(row["output_ids"]),
            final_text=row["final_text"],
            outcome=row["outcome"],
            finish_reason=row["finish_reason"],
            spans=[
                DiscardedSpan(
                    **{c: json.loads(s[c]) if c in _SPAN_JSON else s[c] for c in _SPAN_COLUMNS}
                )
                for s in spans
            ],
            retries=[RetryStrategy.from_dict(r) for r in json.loads(row["retries"])],
            sampled_tokens=row["sampled_tokens"],
            final_scores=json.loads(row["final_scores"]),
            monitors_fired=json.loads(row["monitors_fired"]),
            firings=[Firing(**f) for f in json.loads(row["firings"])],
            prompt_scores=json.loads(row["prompt_scores"]),
            monitor_errors=[MonitorError(**e) for e in json.loads(row["monitor_errors"])],
            deliberation=row["deliberation"],
            reasoning=row["reasoning"],
            reasoning_ids=json.loads(row["reasoning_ids"]),
            reasoning_forced_tokens=row["reasoning_forced_tokens"],
            seed=row["seed"],
            complete=bool(row["complete"]),
        )

    def labels(self, log_id: str) -> builtins.list[Label]:
        """Every label of the record ``log_id``, oldest first (the last is its label);
        :class:`NotFoundError` for an unknown id."""
        with self._tx(snapshot=True) as db:
            rows = (
                db.execute(select(_L).where(_L.c.generation_id == log_id).order_by(_L.c.id))
                .mappings()
                .all()
            )
            if not rows and db.execute(select(_G.c.id).where(_G.c.id == log_id)).first() is None:
                raise self._not_found(log_id)
        return [
            Label(r["generation_id"], r["label"], r["note"], r["reviewer"], r["created"])
            for r in rows
        ]

    def resolve_id(self, prefix: str) -> str:
        """The full id starting with ``prefix`` (NotFoundError if none, InvalidRequestError if several)."""
        with self._tx() as db:
            query = select(_G.c.id).where(_G.c.id.startswith(prefix, autoescape=True)).limit(2)
            ids = db.execute(query).scalars().all()
        if not ids:
            raise self._not_found(prefix)
        if len(ids) > 1:
            raise InvalidRequestError(
                f"log id prefix {prefix!r} is ambiguous; give more characters", param="id"
            )
        return ids[0]

    def list(
        self,
        limit: int = 50,
        offset: int = 0,
        policy: str | None = None,
        outcome: str | None = None,
        monitor: str | None = None,
        since: Time | None = None,
        until: Time | None = None,
        label: str | None = None,
    ) -> builtins.list[LogSummary]:
        """Summaries, newest first, of the records that pass every filter given, skipping ``offset``.

        Filters: ``policy`` name, ``outcome``, ``monitor`` (fired, or condemned a span), creation
        time ``since`` (inclusive) and ``until`` (exclusive), ``label`` (the newest label, one of
        :data:`LABELS`, or ``"unlabelled"``).
        """
        if limit < 0 or offset < 0:
            raise InvalidRequestError(
                "limit and offset must be >= 0", param="limit" if limit < 0 else "offset"
            )
        where = _filters(policy, outcome, monitor, since, until, label)
        query = (
            select(
                _G.c.id,
                _G.c.created,
                _G.c.request_id,
                _G.c.policy_name,
                _G.c.policy_hash,
                _G.c.model,
                _G.c.outcome,
                _G.c.finish_reason,
                _G.c.resets,
                _G.c.monitors_fired,
                func.substr(_G.c.final_text, 1, 200).label("preview"),
                _L.c.label,
                _L.c.note.label("label_note"),
            )
            .select_from(_with_latest_label())
            .where(*where)
            .order_by(_G.c.created.desc(), _G.c.id.desc())
            .limit(limit)
            .offset(offset)
        )
        with self._tx() as db:
            rows = db.execute(query).mappings().all()
        return [
            LogSummary(**{**r, "monitors_fired": json.loads(r["monitors_fired"])}) for r in rows
        ]

    def count(
        self,
        policy: str | None = None,
        outcome: str | None = None,
        monitor: str | None = None,
        since: Time | None = None,
        until: Time | None = None,
        label: str | None = None,
    ) -> int:
        """How many records :meth:`list` would return without ``limit`` and ``offset``."""
        where = _filters(policy, outcome, monitor, since, until, label)
        with self._tx() as db:
            return db.execute(
                select(func.count()).select_from(_with_latest_label()).where(*where)
            ).scalar_one()

    def policies(self) -> builtins.list[str]:
        """Distinct policy names in the log, sorted."""
        with self._tx() as db:
            return list(
                db.execute(select(_G.c.policy_name).distinct().order_by(_G.c.policy_name)).scalars()
            )

    def monitors(self) -> builtins.list[str]:
        """Distinct names of monitors that fired (or condemned a span) in the log, sorted."""
        m = t.generation_monitors
        with self._tx() as db:
            return list(db.execute(select(m.c.monitor).distinct().order_by(m.c.monitor)).scalars())

    def _not_found(self, log_id: str) -> NotFoundError:
        return NotFoundError(
            f"no log record with id {log_id!r} in {self.where}", param="id", code="log_not_found"
        )

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> LogStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _epoch(when: Time) -> float:
    return when.timestamp() if isinstance(when, datetime) else float(when)


def _with_latest_label():
    """``generations`` left-joined with each record's newest label (NULLs when unlabelled)."""
    newer = t.labels.alias("newer")
    latest = select(func.max(newer.c.id)).where(newer.c.generation_id == _G.c.id).scalar_subquery()
    return _G.outerjoin(_L, and_(_L.c.generation_id == _G.c.id, _L.c.id == latest))


def _filters(policy, outcome, monitor, since, until, label) -> builtins.list:
    where = []
    if policy is not None:
        where.append(_G.c.policy_name == policy)
    if outcome is not None:
        where.append(_G.c.outcome == outcome)
    if monitor is not None:
        m = t.generation_monitors
        where.append(exists().where(m.c.generation_id == _G.c.id, m.c.monitor == monitor))
    if since is not None:
        where.append(_G.c.created >= _epoch(since))
    if until is not None:
        where.append(_G.c.created < _epoch(until))
    if label == UNLABELLED:
        where.append(_L.c.id.is_(None))
    elif label is not None:
        if label not in LABELS:
            raise InvalidRequestError(
                f"label filter must be one of {', '.join(LABELS)} or {UNLABELLED}; got {label!r}",
                param="label",
            )
        where.append(_L.c.label == label)
    return where


def _json_records(items: list[Any]) -> str:
    """JSON of a record's nested records (each a dataclass)."""
    return json.dumps([asdict(item) for item in items])
