"""Review queries over the served policies' logs: which stores exist, which holds a record, and
what the serving side knows about a record (the thresholds it was judged by, its tokens).

Read-only: nothing here changes what is served or logged.
"""

from __future__ import annotations

from guard.controller.record import GenerationRecord
from guard.errors import InvalidRequestError, NotFoundError
from guard.logstore import LogStore
from guard.service.registry import PolicyRegistry


class ReviewQueries:
    """What the review API (``server/review.py``) asks of the served policies."""

    def __init__(self, registry: PolicyRegistry) -> None:
        self._registry = registry

    def log_stores(self) -> list[LogStore]:
        """The distinct log stores of the served policies (one per log database), in policy order.

        A store only a replaced version of a policy wrote to is not among them."""
        stores: dict[int, LogStore] = {}
        for s in self._registry.served.values():
            stores.setdefault(id(s.store), s.store)
        return list(stores.values())

    def find_log(self, log_id: str) -> tuple[LogStore, str]:
        """The store holding the record whose id is (or starts with) ``log_id``, and its full id.

        :class:`NotFoundError` if no store has it; :class:`InvalidRequestError` if a prefix matches
        records in several stores (within one store, ``resolve_id`` raises that itself)."""
        found = []
        for store in self.log_stores():
            try:
                found.append((store, store.resolve_id(log_id)))
            except NotFoundError:
                continue
        if not found:
            raise NotFoundError(
                f"no log record with id {log_id!r}", param="id", code="log_not_found"
            )
        if len(found) > 1:
            raise InvalidRequestError(
                f"log id prefix {log_id!r} is ambiguous; give more characters", param="id"
            )
        return found[0]

    def monitor_thresholds(self, policy_name: str, policy_hash: str) -> dict[str, float]:
        """Monitor -> threshold of the served policy ``policy_name``, if the version served now is
        ``policy_hash``; ``{}`` otherwise (the thresholds a record was judged by are then unknown)."""
        s = self._registry.served.get(policy_name)
        if s is None or s.policy.content_hash != policy_hash:
            return {}
        return {b.monitor.name: b.monitor.threshold for b in s.monitors}

    def output_tokens(self, record: GenerationRecord) -> list[str] | None:
        """Each token of ``record.output_ids`` decoded on its own (special tokens spelled out), by a
        served tokenizer that reproduces ``record.final_text`` from them: the engine of the record's
        policy, else one named as its model. ``None`` when no served tokenizer does."""
        served = list(self._registry.served.values())
        engines = [s.engine for s in served if s.policy.name == record.policy_name]
        engines += [s.engine for s in served if s.engine.info.name == record.model]
        for engine in {id(e): e for e in engines}.values():
            tok = engine.tokenizer
            if tok.decode(list(record.output_ids)) != record.final_text:
                continue
            one = getattr(tok, "token_text", None) or (lambda t, tok=tok: tok.decode([t]))
            return [one(t) for t in record.output_ids]
        return None
