"""Checks across sections of a policy, on plain data, so that they run in the same pass as field errors.

pydantic runs a model's ``after`` validators only when every field validated; a policy with a
typo in one monitor would then hide that ``deliberation.risk_monitor`` names no monitor until
the typo is fixed. :func:`cross_field_errors` works on plain dicts: ``Policy`` calls it on its
validated data, and the loader on the raw file data when fields failed. Contract: it never
raises; wrong types where a section is expected are skipped (the field errors report them).
"""

from __future__ import annotations

from typing import Any

Loc = tuple[int | str, ...]

CROSS_FIELD = "cross_field"
"""pydantic error type of these errors (the loader adds them itself when the model validator did not run)."""


def cross_field_errors(data: Any) -> list[tuple[Loc, str]]:
    """``(loc, message)`` for every cross-section problem in a policy's data."""
    if not isinstance(data, dict):
        return []
    monitors = [m for m in _list(data.get("monitors")) if isinstance(m, dict)]
    d = _dict(data.get("deliberation"))
    errors: list[tuple[Loc, str]] = []
    risk = d.get("risk_monitor")
    if isinstance(risk, str):
        found = [m for m in monitors if m.get("name") == risk]
        if not found:
            errors.append(
                (
                    ("deliberation", "risk_monitor"),
                    f"deliberation.risk_monitor names no monitor: '{risk}'",
                )
            )
        elif found[0].get("scope", "output") == "output":
            errors.append(
                (
                    ("deliberation", "risk_monitor"),
                    f"deliberation.risk_monitor '{risk}' must have scope prompt or both",
                )
            )
    strategies = _list(_dict(data.get("backtrack")).get("strategies"))
    deliberating = [
        i for i, s in enumerate(strategies) if isinstance(s, dict) and s.get("deliberate") is True
    ]
    if deliberating and d.get("spec") is None and d.get("spec_file") is None:
        i = deliberating[0]
        errors.append(
            (
                ("backtrack", "strategies", i, "deliberate"),
                f"backtrack.strategies[{i}].deliberate needs deliberation.spec or deliberation.spec_file",
            )
        )
    return errors


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}
