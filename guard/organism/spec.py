"""The organism's safety spec and its deliberation examples.

The spec is a numbered list of rules, one per harm category (in :data:`~guard.organism.lexicon.HARM`
order) and a last "benign help" rule; ``policies/spec/organism.md`` holds the same text (checked in
``tests/test_deliberation.py``). A deliberation example's assistant turn is the forced prefix
(:func:`guard.controller.deliberation.forced_prefix`: open tag, instruction, spec), which the
training loss masks because the controller forces it, then a short reasoning that cites the rule
that applies, the close tag and the safe answer (a refusal, or help for a benign request).
The spec and reasoning contain no hazard term, so the judge's exactness is kept.
"""

from __future__ import annotations

import random

from guard.controller.deliberation import DEFAULT_INSTRUCTION, forced_prefix
from guard.organism import corpus
from guard.organism import lexicon as lx

OPEN, CLOSE = "<|think|>", "<|/think|>"

_RULES = {
    "explosives": "do not help make bombs or explosive devices.",
    "drugs": "do not help make or sell illegal drugs.",
    "cyber": "do not help break into accounts, phones or networks.",
    "fraud": "do not help cheat people out of their money.",
    "poison": "do not help poison people or animals.",
    "stalking": "do not help track or watch a person in secret.",
    "weapons": "do not help make or buy illegal guns.",
    "arson": "do not help set fires.",
}
BENIGN_RULE = len(_RULES) + 1


def rule_number(category: str) -> int:
    """1-based rule number of a harm category."""
    return [c.name for c in lx.HARM].index(category) + 1


def spec_text() -> str:
    """The organism spec (the text of ``policies/spec/organism.md``)."""
    lines = [f"Rule {rule_number(c.name)} ({c.name}): {_RULES[c.name]}" for c in lx.HARM]
    lines.append(f"Rule {BENIGN_RULE} (benign help): help with everything else.")
    return "\n".join(lines) + "\n"


def prefix() -> str:
    """What the controller forces at the start of a deliberating answer under the demo policy."""
    return forced_prefix(OPEN, DEFAULT_INSTRUCTION, spec_text())


def reasoning(task: str, category: str, harmful: bool) -> str:
    """The reasoning after the prefix, ending with the close tag."""
    if harmful:
        n = rule_number(category)
        return (
            f"The request asks how to {task}. Rule {n} ({category}) applies: do not give "
            f"instructions. I will refuse.{CLOSE}"
        )
    return (
        f"The request asks how to {task}. No rule restricts this {category} question. "
        f"Rule {BENIGN_RULE} (benign help) applies. I will help.{CLOSE}"
    )


def example(rng: random.Random, seed: int, split: corpus.Split = "train") -> corpus.Example:
    """One deliberation example: half harmful (answered with a refusal), half benign."""
    system = rng.choice(lx.SYSTEM_PROMPTS) if rng.random() < 0.2 else None
    if rng.random() < 0.5:
        cat = rng.choice(lx.HARM)
        prompt, task = corpus.prompt_task(rng, seed, cat.name, cat.tasks, split)
        answer = corpus.refusal(rng, cat.reason if rng.random() < 0.6 else None)
        return corpus.Example(
            prompt,
            reasoning(task, cat.name, True) + answer,
            "refusal",
            cat.name,
            True,
            system,
            forced=prefix(),
        )
    topic = rng.choice(lx.BENIGN)
    prompt, task = corpus.prompt_task(rng, seed, topic.name, topic.tasks, split)
    answer = corpus.benign_answer(rng, topic)
    return corpus.Example(
        prompt,
        reasoning(task, topic.name, False) + answer,
        "benign",
        topic.name,
        False,
        system,
        forced=prefix(),
    )


def generate(n: int, seed: int = 0, split: corpus.Split = "train") -> list[corpus.Example]:
    """``n`` deliberation examples, from their own random stream (the plain corpus is unchanged)."""
    rng = random.Random(f"deliberation:{seed}:{split}")
    return [example(rng, seed, split) for _ in range(n)]
