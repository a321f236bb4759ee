"""The flagged-generation log: one SQLite file of :class:`GenerationRecord` rows.

Storage invariants:

- The schema is built only by the append-only :data:`MIGRATIONS` list. Each migration runs once,
  in its own transaction, and is recorded by name in ``_migrations``; never edit or reorder a
  released migration, add a new one.
- ``generations`` holds one row per record; ``spans`` one row per discarded span, keyed by
  ``(generation_id, idx)`` with ``idx`` the span's position in ``GenerationRecord.spans``.
  Lists and dicts are stored as JSON text, so :meth:`LogStore.get` returns a record equal to the
  one written (floats round-trip exactly through ``json``).
- Log ids are 32 hex characters: 12 of milliseconds since the epoch, 20 random, so ids sort by
  write time.
- WAL journal with ``synchronous=FULL``: when :meth:`LogStore.write` returns, the record is on
  disk and visible to every other connection.
- One connection per store, shared by all threads and serialised by a lock (writes come from an
  engine worker, reads from server threads; the log is far from being a bottleneck).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from guard.controller.record import DiscardedSpan, GenerationRecord, RetryStrategy
from guard.errors import InvalidRequestError, NotFoundError

MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = []


def migration(fn: Callable[[sqlite3.Connection], None]) -> Callable[[sqlite3.Connection], None]:
    """Append ``fn`` to :data:`MIGRATIONS`; it is recorded under its function name."""
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_initial(db: sqlite3.Connection) -> None:
    db.execute("""
        CREATE TABLE generations (
            id TEXT PRIMARY KEY,
            request_id TEXT NOT NULL,
            created REAL NOT NULL,
            policy_name TEXT NOT NULL,
            policy_hash TEXT NOT NULL,
            model TEXT NOT NULL,
            messages TEXT,              -- JSON list of chat messages, NULL for completions
            prompt TEXT,
            prompt_tokens INTEGER NOT NULL,
            output_ids TEXT NOT NULL,   -- JSON list of token ids
            final_text TEXT NOT NULL,
            outcome TEXT NOT NULL,
            finish_reason TEXT,
            resets INTEGER NOT NULL,    -- number of discarded spans
            sampled_tokens INTEGER NOT NULL,
            monitors_fired TEXT NOT NULL,  -- JSON list of monitor names
            retries TEXT NOT NULL,         -- JSON list of RetryStrategy dicts
            final_scores TEXT NOT NULL     -- JSON {monitor: [score, ...]}
        )""")
    db.execute("""
        CREATE TABLE spans (
            generation_id TEXT NOT NULL REFERENCES generations(id) ON DELETE CASCADE,
            idx INTEGER NOT NULL,
            attempt INTEGER NOT NULL,
            start INTEGER NOT NULL,
            monitor TEXT NOT NULL,
            threshold REAL NOT NULL,
            fired_at INTEGER NOT NULL,
            fired_token_id INTEGER NOT NULL,
            fired_token TEXT NOT NULL,
            retracted_chars INTEGER NOT NULL,
            text TEXT NOT NULL,
            token_ids TEXT NOT NULL,    -- JSON list
            tokens TEXT NOT NULL,       -- JSON list of decoded tokens
            scores TEXT NOT NULL,       -- JSON {monitor: [raw score per token]}
            aggregated TEXT NOT NULL,   -- JSON {monitor: [aggregated score per token]}
            PRIMARY KEY (generation_id, idx)
        )""")
    db.execute("CREATE INDEX generations_created ON generations(created)")
    db.execute("CREATE INDEX generations_policy ON generations(policy_name, created)")
    db.execute("CREATE INDEX generations_outcome ON generations(outcome, created)")
    db.execute("CREATE INDEX spans_monitor ON spans(monitor)")


@migration
def m002_firings_prompt_scores_errors(db: sqlite3.Connection) -> None:
    # Prompt-scope firings, log-only firings and monitor errors were kept only in memory before.
    db.execute("ALTER TABLE generations ADD COLUMN firings TEXT NOT NULL DEFAULT '[]'")  # JSON list of dicts
    db.execute("ALTER TABLE generations ADD COLUMN prompt_scores TEXT NOT NULL DEFAULT '{}'")  # {monitor: [...]}
    db.execute("ALTER TABLE generations ADD COLUMN monitor_errors TEXT NOT NULL DEFAULT '[]'")  # JSON list


@migration
def m003_deliberation(db: sqlite3.Connection) -> None:
    # The reasoning section of a deliberating answer, stored beside the answer.
    db.execute("ALTER TABLE generations ADD COLUMN deliberation TEXT")  # trigger, NULL: none
    db.execute("ALTER TABLE generations ADD COLUMN reasoning TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE generations ADD COLUMN reasoning_ids TEXT NOT NULL DEFAULT '[]'")  # JSON list
    db.execute("ALTER TABLE generations ADD COLUMN reasoning_forced_tokens INTEGER NOT NULL DEFAULT 0")


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


_SPAN_COLUMNS = ("attempt", "start", "monitor", "threshold", "fired_at", "fired_token_id", "fired_token",
                 "retracted_chars", "text", "token_ids", "tokens", "scores", "aggregated")
_SPAN_JSON = {"token_ids", "tokens", "scores", "aggregated"}


def new_log_id(now: float | None = None) -> str:
    """A time-ordered id: 12 hex digits of epoch milliseconds, then 20 random hex digits."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ms:012x}{secrets.token_hex(10)}"


class LogStore:
    """Read and write generation records in the SQLite file at ``path`` (created if missing)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    # -- schema -------------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """Lock, BEGIN IMMEDIATE, commit on success, roll back on error."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _migrate(self) -> None:
        with self._transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied REAL NOT NULL)")
        for fn in MIGRATIONS:
            # Re-checked inside the transaction: another process may have migrated meanwhile.
            with self._transaction() as db:
                if db.execute("SELECT 1 FROM _migrations WHERE name = ?", (fn.__name__,)).fetchone():
                    continue
                fn(db)
                db.execute("INSERT INTO _migrations (name, applied) VALUES (?, ?)", (fn.__name__, time.time()))

    def migrations(self) -> list[str]:
        """Names of the migrations applied to this database, in order."""
        with self._lock:
            return [r["name"] for r in self._db.execute("SELECT name FROM _migrations ORDER BY rowid")]

    # -- writing ------------------------------------------------------------------------------

    def write(self, record: GenerationRecord) -> str:
        """Store ``record`` durably and return its log id."""
        log_id = new_log_id()
        row = {
            "id": log_id, "request_id": record.request_id, "created": record.created,
            "policy_name": record.policy_name, "policy_hash": record.policy_hash, "model": record.model,
            "messages": None if record.messages is None else json.dumps(record.messages),
            "prompt": record.prompt, "prompt_tokens": record.prompt_tokens,
            "output_ids": json.dumps(record.output_ids), "final_text": record.final_text,
            "outcome": record.outcome, "finish_reason": record.finish_reason, "resets": len(record.spans),
            "sampled_tokens": record.sampled_tokens, "monitors_fired": json.dumps(record.monitors_fired),
            "retries": json.dumps([asdict(r) for r in record.retries]),
            "final_scores": json.dumps(record.final_scores), "firings": json.dumps(record.firings),
            "prompt_scores": json.dumps(record.prompt_scores), "monitor_errors": json.dumps(record.monitor_errors),
            "deliberation": record.deliberation, "reasoning": record.reasoning,
            "reasoning_ids": json.dumps(record.reasoning_ids), "reasoning_forced_tokens": record.reasoning_forced_tokens,
        }
        spans = [self._span_row(log_id, i, span) for i, span in enumerate(record.spans)]
        with self._transaction() as db:
            db.execute(f"INSERT INTO generations ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                       tuple(row.values()))
            cols = ("generation_id", "idx") + _SPAN_COLUMNS
            db.executemany(f"INSERT INTO spans ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", spans)
        return log_id

    @staticmethod
    def _span_row(log_id: str, idx: int, span: DiscardedSpan) -> tuple:
        data = asdict(span)
        return (log_id, idx) + tuple(json.dumps(data[c]) if c in _SPAN_JSON else data[c] for c in _SPAN_COLUMNS)

    # -- reading ------------------------------------------------------------------------------

    def get(self, log_id: str) -> GenerationRecord:
        """The record stored under ``log_id``; :class:`NotFoundError` if there is none."""
        with self._lock:
            row = self._db.execute("SELECT * FROM generations WHERE id = ?", (log_id,)).fetchone()
            spans = self._db.execute("SELECT * FROM spans WHERE generation_id = ? ORDER BY idx", (log_id,)).fetchall()
        if row is None:
            raise NotFoundError(f"no log record with id {log_id!r} in {self.path}", param="id", code="log_not_found")
        return GenerationRecord(
            request_id=row["request_id"], policy_name=row["policy_name"], policy_hash=row["policy_hash"],
            model=row["model"], messages=None if row["messages"] is None else json.loads(row["messages"]),
            prompt=row["prompt"], prompt_tokens=row["prompt_tokens"], created=row["created"],
            output_ids=json.loads(row["output_ids"]), final_text=row["final_text"], outcome=row["outcome"],
            finish_reason=row["finish_reason"],
            spans=[DiscardedSpan(**{c: json.loads(s[c]) if c in _SPAN_JSON else s[c] for c in _SPAN_COLUMNS})
                   for s in spans],
            retries=[RetryStrategy(**r) for r in json.loads(row["retries"])],
            sampled_tokens=row["sampled_tokens"], final_scores=json.loads(row["final_scores"]),
            monitors_fired=json.loads(row["monitors_fired"]), firings=json.loads(row["firings"]),
            prompt_scores=json.loads(row["prompt_scores"]), monitor_errors=json.loads(row["monitor_errors"]),
            deliberation=row["deliberation"], reasoning=row["reasoning"], reasoning_ids=json.loads(row["reasoning_ids"]),
            reasoning_forced_tokens=row["reasoning_forced_tokens"],
        )

    def resolve_id(self, prefix: str) -> str:
        """The full id starting with ``prefix`` (NotFoundError if none, InvalidRequestError if several)."""
        pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        with self._lock:
            ids = [r["id"] for r in self._db.execute(
                "SELECT id FROM generations WHERE id LIKE ? ESCAPE '\\' LIMIT 2", (pattern,))]
        if not ids:
            raise NotFoundError(f"no log record with id {prefix!r} in {self.path}", param="id", code="log_not_found")
        if len(ids) > 1:
            raise InvalidRequestError(f"log id prefix {prefix!r} is ambiguous; give more characters", param="id")
        return ids[0]

    def list(self, limit: int = 50, policy: str | None = None, outcome: str | None = None,
             monitor: str | None = None, since: float | datetime | None = None) -> list[LogSummary]:
        """Summaries of the newest records first, filtered by policy name, outcome, fired monitor
        and creation time (``since``: epoch seconds or a datetime, inclusive)."""
        where, params = [], []
        if policy is not None:
            where.append("policy_name = ?")
            params.append(policy)
        if outcome is not None:
            where.append("outcome = ?")
            params.append(outcome)
        if monitor is not None:
            where.append("(EXISTS (SELECT 1 FROM json_each(g.monitors_fired) WHERE value = ?)"
                         " OR EXISTS (SELECT 1 FROM spans s WHERE s.generation_id = g.id AND s.monitor = ?))")
            params += [monitor, monitor]
        if since is not None:
            where.append("created >= ?")
            params.append(since.timestamp() if isinstance(since, datetime) else float(since))
        sql = ("SELECT id, created, request_id, policy_name, policy_hash, model, outcome, finish_reason, resets,"
               " monitors_fired, substr(final_text, 1, 200) AS preview FROM generations g"
               + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY created DESC, id DESC LIMIT ?")
        with self._lock:
            rows = self._db.execute(sql, (*params, int(limit))).fetchall()
        return [LogSummary(**{**dict(r), "monitors_fired": json.loads(r["monitors_fired"])}) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "LogStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
