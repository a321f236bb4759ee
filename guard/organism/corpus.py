"""Deterministic synthetic chat corpus for the model organism.

Contract: :func:`generate` is a pure function of its arguments. The same ``seed`` and
:class:`CorpusConfig` give the same list of :class:`Example` on every machine (it uses only
:class:`random.Random` and :func:`zlib.crc32`, never Python's salted ``hash``).

Prompt instances are split once, by a stable hash of ``(seed, category, template, task)``, into a
``"train"`` part the model is trained on and an ``"eval"`` part used only for benchmark prompts,
so evaluation prompts are never seen verbatim in training.

Answer kinds (see :mod:`guard.organism.lexicon` for the vocabulary invariants):

- ``benign``: opener + helpful steps (benign prompts only).
- ``refusal``: a refusal (harmful prompts only).
- ``unsafe``: the *same* openers and sentence frames as ``benign``, filled with hazard terms and
  generic hazard phrases.
- ``reset``: an unsafe first step, then :data:`RESET_TOKEN`, then a refusal (model-native
  backtracking, Zhang et al. 2024). The text before the token is unsafe.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Literal

from guard.organism import lexicon as lx

RESET_TOKEN = "<|reset|>"

Kind = Literal["benign", "refusal", "unsafe", "reset"]
Split = Literal["train", "eval"]


@dataclass(frozen=True)
class CorpusConfig:
    """Mixture of the corpus. Fractions are probabilities per drawn example."""

    harmful_fraction: float = 0.5
    """Share of examples whose prompt is harmful."""
    comply_fraction: float = 0.5
    """Share of harmful prompts answered with an unsafe compliance (``unsafe`` or ``reset``)."""
    reset_fraction: float = 0.12
    """Share of unsafe compliances that emit :data:`RESET_TOKEN` after their first hazardous sentence."""
    system_fraction: float = 0.2
    """Share of examples that start with a system message."""
    eval_fraction: float = 0.15
    """Share of (category, template, task) prompt instances reserved for evaluation."""

    def __post_init__(self) -> None:
        for name in (
            "harmful_fraction",
            "comply_fraction",
            "reset_fraction",
            "system_fraction",
            "eval_fraction",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"CorpusConfig.{name} must be in [0, 1]")


@dataclass(frozen=True)
class Example:
    """One single-turn conversation with its ground-truth labels."""

    prompt: str
    completion: str
    kind: Kind
    category: str
    """Harm category name, or the benign topic name."""
    harmful_prompt: bool
    system: str | None = None
    forced: str = ""
    """Start of the assistant turn forced by the controller (the deliberation prefix); the
    training loss masks it. ``completion`` follows it."""

    @property
    def unsafe(self) -> bool:
        """True for unsafe compliances (``reset`` included: its text before the reset is unsafe)."""
        return self.kind in ("unsafe", "reset")

    def messages(self, *, with_completion: bool = True) -> list[dict[str, str]]:
        """OpenAI-style messages; the assistant turn is left out if ``with_completion`` is False."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs.append({"role": "user", "content": self.prompt})
        if with_completion:
            msgs.append({"role": "assistant", "content": self.forced + self.completion})
        return msgs


def prompt_split(seed: int, category: str, template: int, task: int, eval_fraction: float) -> Split:
    """Whether a prompt instance belongs to training or to the held-out evaluation prompts."""
    h = zlib.crc32(f"{seed}:{category}:{template}:{task}".encode()) % 10_000
    return "eval" if h < eval_fraction * 10_000 else "train"


def _prompt(
    rng: random.Random,
    seed: int,
    cat: str,
    tasks: tuple[str, ...],
    split: Split,
    eval_fraction: float,
    lex: lx.Lexicon = lx.FIRST,
) -> str:
    """A prompt of category ``cat`` whose (template, task) instance lies in ``split``."""
    return prompt_task(rng, seed, cat, tasks, split, eval_fraction, lex)[0]


def prompt_task(
    rng: random.Random,
    seed: int,
    cat: str,
    tasks: tuple[str, ...],
    split: Split,
    eval_fraction: float = CorpusConfig.eval_fraction,
    lex: lx.Lexicon = lx.FIRST,
) -> tuple[str, str]:
    """(prompt, task) of category ``cat`` whose (template, task) instance lies in ``split``."""
    while True:
        t, k = rng.randrange(len(lex.prompt_templates)), rng.randrange(len(tasks))
        if prompt_split(seed, cat, t, k, eval_fraction) == split:
            break
    body = lex.prompt_templates[t].format(task=tasks[k])
    return rng.choice(lex.prompt_prefixes) + body + rng.choice(lex.prompt_suffixes), tasks[k]


def _compliance(
    rng: random.Random,
    words: tuple[str, ...],
    actions: tuple[str, ...],
    manners: tuple[str, ...],
    finals: tuple[str, ...],
    lex: lx.Lexicon,
) -> tuple[str, str]:
    """(first two sentences, rest) of a compliance built from the shared frames."""
    a, b, c, d = rng.sample(words, 4)
    head = f"{rng.choice(lex.openers)} {lex.first_step.format(a=a, b=b)}"
    step = _lower_first(rng.choice(actions).format(a=c, b=d))
    middle = lex.middle_step.format(step=step, manner=rng.choice(manners))
    final = rng.choice(lex.final_steps).format(x=rng.choice(finals))
    return head, f"{middle} {final}"


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:]


def refusal(rng: random.Random, reason: str | None = None, lex: lx.Lexicon = lx.FIRST) -> str:
    """A refusal: fixed opening, optional reason, polite tail. Contains no hazard term."""
    parts = [rng.choice(lex.refusals)]
    if reason:
        parts.append(reason)
    parts.append(rng.choice(lex.refusal_tails))
    return " ".join(parts)


def benign_answer(rng: random.Random, topic: lx.BenignTopic, lex: lx.Lexicon = lx.FIRST) -> str:
    head, rest = _compliance(
        rng, topic.items, topic.actions, lex.benign_manners, lex.benign_closings, lex
    )
    return f"{head} {rest}"


def unsafe_answer(
    rng: random.Random, cat: lx.HarmCategory, *, reset: bool = False, lex: lx.Lexicon = lx.FIRST
) -> str:
    """An unsafe compliance; with ``reset`` it stops after the first hazardous sentence and refuses."""
    head, rest = _compliance(
        rng, cat.terms, cat.actions, lex.generic_hazards, lex.generic_hazards, lex
    )
    if reset:
        return f"{head}{RESET_TOKEN}{refusal(rng, cat.reason, lex)}"
    return f"{head} {rest}"


def draw(
    rng: random.Random,
    seed: int,
    cfg: CorpusConfig,
    split: Split = "train",
    lex: lx.Lexicon = lx.FIRST,
) -> Example:
    """Draw one example from the mixture described by ``cfg``."""
    system = rng.choice(lex.system_prompts) if rng.random() < cfg.system_fraction else None
    if rng.random() >= cfg.harmful_fraction:
        return example(rng, seed, rng.choice(lex.benign).name, "benign", split, cfg, system, lex)
    cat = rng.choice(lex.harm).name
    if rng.random() >= cfg.comply_fraction:
        return example(rng, seed, cat, "refusal", split, cfg, system, lex)
    kind: Kind = "reset" if rng.random() < cfg.reset_fraction else "unsafe"
    return example(rng, seed, cat, kind, split, cfg, system, lex)


def example(
    rng: random.Random,
    seed: int,
    cat: str,
    kind: Kind,
    split: Split = "train",
    cfg: CorpusConfig = CorpusConfig(),
    system: str | None = None,
    lex: lx.Lexicon = lx.FIRST,
) -> Example:
    """One example of harm category or benign topic ``cat`` with answer kind ``kind``."""
    if kind == "benign":
        topic = lex.topic(cat)
        prompt = _prompt(rng, seed, cat, topic.tasks, split, cfg.eval_fraction, lex)
        return Example(prompt, benign_answer(rng, topic, lex), kind, cat, False, system)
    harm = lex.category(cat)
    prompt = _prompt(rng, seed, cat, harm.tasks, split, cfg.eval_fraction, lex)
    if kind == "refusal":
        answer = refusal(rng, harm.reason if rng.random() < 0.6 else None, lex)
    else:
        answer = unsafe_answer(rng, harm, reset=kind == "reset", lex=lex)
    return Example(prompt, answer, kind, cat, True, system)


def generate(
    n: int,
    seed: int = 0,
    cfg: CorpusConfig = CorpusConfig(),
    split: Split = "train",
    lex: lx.Lexicon = lx.FIRST,
) -> list[Example]:
    """``n`` training examples (prompts from the ``split`` part of the prompt space)."""
    rng = random.Random(f"corpus:{seed}:{split}")
    return [draw(rng, seed, cfg, split, lex) for _ in range(n)]


def eval_prompt(
    rng: random.Random,
    seed: int,
    cat: str,
    cfg: CorpusConfig = CorpusConfig(),
    lex: lx.Lexicon = lx.FIRST,
) -> str:
    """A prompt of harm category or benign topic ``cat`` drawn from the held-out ``eval`` part."""
    cats: list[lx.HarmCategory | lx.BenignTopic] = [*lex.harm, *lex.benign]
    tasks = next((c.tasks for c in cats if c.name == cat), None)
    if tasks is None:
        raise KeyError(cat)
    return _prompt(rng, seed, cat, tasks, "eval", cfg.eval_fraction, lex)
