"""The judge ``guard eval`` calls on every final answer, and ``guard probe train --judge`` on every
sampled calibration answer: is it unsafe?

Three forms, each turned into one ``str -> bool`` function:

- a Python callable ``module:function`` taking the answer text and returning a bool, or an object
  with a boolean ``unsafe`` attribute (e.g. ``guard.organism.judge:judge``);
- a regular expression: unsafe iff it matches anywhere (case-insensitive);
- a word-list file: one word or phrase per line (``#`` comments, blank lines ignored); unsafe iff
  one occurs as a whole word, ignoring case.
"""

from __future__ import annotations

import argparse
import importlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from guard.errors import InvalidRequestError

Judge = Callable[[str], bool]


class JudgeError(InvalidRequestError):
    """The judge cannot be loaded, failed, or returned something that is not a verdict; ``param``
    names its option (``judge``, ``judge_regex``, ``judge_words``)."""


class NamedJudge(NamedTuple):
    """A judge with the option that gave it, for reports and errors."""

    verdict: Judge
    option: str
    """The option as given, e.g. ``--judge mod:fn``."""
    param: str
    """The option's parameter name: ``judge``, ``judge_regex`` or ``judge_words``."""


def from_callable(spec: str) -> Judge:
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise JudgeError(f"--judge {spec!r}: expected module:function", param="judge")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise JudgeError(f"--judge {spec!r}: {exc}", param="judge") from None
    if not callable(fn):
        raise JudgeError(f"--judge {spec!r} is not callable", param="judge")

    def judge(text: str) -> bool:
        out = fn(text)
        verdict = getattr(out, "unsafe", out)
        if not isinstance(verdict, bool):
            raise JudgeError(
                f"--judge {spec!r} returned {type(out).__name__}, not a bool or an object with "
                "a bool 'unsafe'",
                param="judge",
            )
        return verdict

    return judge


def from_regex(pattern: str) -> Judge:
    if not pattern:
        raise JudgeError(
            "--judge-regex '': an empty pattern matches every answer", param="judge_regex"
        )
    try:
        rx = re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise JudgeError(f"--judge-regex {pattern!r}: {exc}", param="judge_regex") from None
    return lambda text: rx.search(text) is not None


def from_words(path: str | Path) -> Judge:
    path = Path(path)
    if not path.is_file():
        raise JudgeError(f"--judge-words {path}: no such file", param="judge_words")
    words = [w.strip() for w in path.read_text(encoding="utf-8").splitlines()]
    words = [w for w in words if w and not w.startswith("#")]
    if not words:
        raise JudgeError(f"--judge-words {path}: no words", param="judge_words")
    alts = sorted(set(words), key=len, reverse=True)
    return from_regex(r"(?<!\w)(?:" + "|".join(map(re.escape, alts)) + r")(?!\w)")


def add_arguments(parser: argparse.ArgumentParser, *, required: bool, what: str) -> None:
    """Add the three mutually exclusive judge options (``--judge``, ``--judge-regex``,
    ``--judge-words``) to ``parser``; ``what`` says what the judge is for, in the help."""
    j = parser.add_mutually_exclusive_group(required=required)
    j.add_argument(
        "--judge",
        metavar="MODULE:FUNCTION",
        help=f"{what}: a callable, answer text -> bool (or .unsafe)",
    )
    j.add_argument(
        "--judge-regex",
        metavar="PATTERN",
        help=f"{what}: unsafe iff the regex matches (case-insensitive)",
    )
    j.add_argument(
        "--judge-words",
        metavar="FILE",
        type=Path,
        help=f"{what}: unsafe iff a listed word/phrase occurs",
    )


def from_args(args: argparse.Namespace) -> NamedJudge | None:
    """The judge the options of :func:`add_arguments` name; ``None`` when none was given (an
    empty value is given, and an error)."""
    if args.judge is not None:
        return NamedJudge(from_callable(args.judge), f"--judge {args.judge}", "judge")
    if args.judge_regex is not None:
        return NamedJudge(
            from_regex(args.judge_regex), f"--judge-regex {args.judge_regex}", "judge_regex"
        )
    if args.judge_words is not None:
        return NamedJudge(
            from_words(args.judge_words), f"--judge-words {args.judge_words}", "judge_words"
        )
    return None
