"""The schema the migrations build, as SQLAlchemy tables for writing queries (never for DDL).

Must match :mod:`guard.logstore.migrations` column for column; ``tests/test_logstore.py`` reflects a
migrated database and compares. JSON-valued columns are TEXT holding ``json.dumps`` output, so both
databases return byte-identical values.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, Integer, MetaData, Table, Text

metadata = MetaData()

generations = Table(
    "generations",
    metadata,
    Column("id", Text, primary_key=True),
    Column("request_id", Text, nullable=False),
    Column("created", Float, nullable=False),
    Column("policy_name", Text, nullable=False),
    Column("policy_hash", Text, nullable=False),
    Column("model", Text, nullable=False),
    Column("messages", Text),
    Column("prompt", Text),
    Column("prompt_tokens", Integer, nullable=False),
    Column("output_ids", Text, nullable=False),
    Column("final_text", Text, nullable=False),
    Column("outcome", Text, nullable=False),
    Column("finish_reason", Text),
    Column("resets", Integer, nullable=False),
    Column("sampled_tokens", Integer, nullable=False),
    Column("monitors_fired", Text, nullable=False),
    Column("retries", Text, nullable=False),
    Column("final_scores", Text, nullable=False),
    Column("firings", Text, nullable=False),
    Column("prompt_scores", Text, nullable=False),
    Column("monitor_errors", Text, nullable=False),
    Column("deliberation", Text),
    Column("reasoning", Text, nullable=False),
    Column("reasoning_ids", Text, nullable=False),
    Column("reasoning_forced_tokens", Integer, nullable=False),
    Column("seed", BigInteger),
    Column("complete", Integer, nullable=False),
)

spans = Table(
    "spans",
    metadata,
    Column("generation_id", Text, primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("attempt", Integer, nullable=False),
    Column("start", Integer, nullable=False),
    Column("monitor", Text, nullable=False),
    Column("threshold", Float, nullable=False),
    Column("fired_at", Integer, nullable=False),
    Column("fired_token_id", Integer, nullable=False),
    Column("fired_token", Text, nullable=False),
    Column("retracted_chars", Integer, nullable=False),
    Column("text", Text, nullable=False),
    Column("token_ids", Text, nullable=False),
    Column("tokens", Text, nullable=False),
    Column("scores", Text, nullable=False),
    Column("aggregated", Text, nullable=False),
)

generation_monitors = Table(
    "generation_monitors",
    metadata,
    Column("generation_id", Text, primary_key=True),
    Column("monitor", Text, primary_key=True),
)

labels = Table(
    "labels",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("generation_id", Text, nullable=False),
    Column("label", Text, nullable=False),
    Column("note", Text, nullable=False),
    Column("reviewer", Text, nullable=False),
    Column("created", Float, nullable=False),
)
