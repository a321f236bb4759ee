"""The flagged-generation log: :class:`GenerationRecord` rows in SQLite (default) or Postgres.

- :mod:`guard.logstore.store`: :class:`LogStore` (write, get, list/count with filters, labels,
  purge) and its storage invariants;
- :mod:`guard.logstore.migrations`: the schema, as an append-only list of migrations run on open;
- :mod:`guard.logstore.connect`: targets (a path or a URL) to configured database engines.
"""

from guard.logstore.migrations import MIGRATIONS
from guard.logstore.store import LABELS, UNLABELLED, Label, LogStore, LogSummary, new_log_id

__all__ = ["LABELS", "MIGRATIONS", "UNLABELLED", "Label", "LogStore", "LogSummary", "new_log_id"]
