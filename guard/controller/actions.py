"""The vocabulary a policy and the controller share: monitor actions, scopes, rollback rules, and
which resampling strategy a retry uses. Written once here; the policy schema and the controller
both import it (it needs no torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, TypeVar

Rollback = Literal["auto", "tokens", "sentence", "response"]
Action = Literal["backtrack", "refuse", "shadow"]
Scope = Literal["prompt", "output", "both"]
FiringScope = Literal["prompt", "output", "recheck"]
"""Where a firing was seen: the prompt, the output as it streamed, or the from-scratch re-check."""
OnMonitorError = Literal["fail_closed", "fail_open"]

ACTIONS: tuple[str, ...] = ("backtrack", "refuse", "shadow")
ACTION_ALIASES = {"log": "shadow"}
"""Earlier names still accepted: ``log`` was the name of ``shadow`` (a firing only recorded)."""


def canonical_action(value: Any) -> Any:
    """``value`` with an earlier action name replaced by its current one (anything else unchanged)."""
    return ACTION_ALIASES.get(value, value) if isinstance(value, str) else value


def acts(action: str) -> bool:
    """Whether a firing with this action changes the answer (``shadow`` only records)."""
    return canonical_action(action) != "shadow"


T = TypeVar("T")


def strategy_for_retry(strategies: Sequence[T], retry: int) -> T:
    """The strategy of the ``retry``-th retry, 1-based; the last one repeats for later retries.

    ``retry`` below 1 is not a retry: :class:`ValueError` (a caller off by one would otherwise get
    some strategy silently)."""
    if retry < 1:
        raise ValueError(f"retries count from 1, got {retry}")
    if not strategies:
        raise ValueError("no resampling strategy")
    return strategies[min(retry, len(strategies)) - 1]
