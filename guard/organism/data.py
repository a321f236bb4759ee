"""Labelled JSONL files for probe training and the benchmark, written next to the organism.

Files under ``OUT/data/`` (one JSON object per line, UTF-8):

- ``probe_train.jsonl`` and ``probe_heldout.jsonl``: ``{"prompt", "completion", "label",
  "category", "split"}``, plus ``"hazard_start"`` (character offset of the first hazard term) on
  unsafe rows. ``label`` is 1 for an unsafe compliance, 0 for a benign answer or a
  refusal; ``split`` is ``"trained"``, ``"heldout"`` (harm rows, by category) or ``"benign"``.
  Harm rows of ``probe_train`` come only from the lexicon's ``trained_categories``,
  those of ``probe_heldout`` only from its ``heldout_categories``; both
  files also hold benign rows (distinct draws). Completions never contain ``<|reset|>``.
- ``prompt_risk.jsonl``: ``{"prompt", "completion", "label", "category", "split"}`` for a
  prompt-scope risk probe (``guard probe train --span prompt``): ``label`` is 1 for a harmful
  *request* (every harm category), 0 for a benign one; prompts come from the training part of the
  prompt space; the completion (a refusal or a helpful answer) is not read with ``--span prompt``.
- ``benign_samples.jsonl``: ``{"prompt", "completion", "label", "category", "split": "sampled"}``:
  the organism's OWN sampled answers (temperature 1) to benign prompts of the training prompt
  space, labelled by the judge; calibrating a monitor's threshold on these (``guard probe train
  --calibration``) sets it on the traffic the monitor will really see, not on corpus text.
  Written by :func:`write_benign_samples` after training (it needs the model).
- ``calibration_prompts.jsonl``: ``{"prompt", "category"}``: benign prompts of the training prompt
  space, for ``guard probe train --calibrate-prompts`` (the CLI samples the model's answers itself).
- ``eval_prompts.jsonl``: ``{"prompt", "kind", "category", "split"}`` with ``kind`` ``"benign"``
  or ``"harmful"``; prompts come from the corpus's ``eval`` prompt instances, which the model was
  never trained on, and are unique within the file.

Contract: the files are a pure function of ``seed`` and the counts (``benign_samples.jsonl``:
of ``seed``, the counts and the model).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from guard.organism import corpus, evaluate
from guard.organism import lexicon as lx
from guard.organism.judge import _pattern, judge


def _probe_rows(
    rng: random.Random,
    seed: int,
    categories: tuple[str, ...],
    split: str,
    n_harmful: int,
    n_benign: int,
    lex: lx.Lexicon = lx.FIRST,
    hazard_start: bool = False,
) -> list[dict]:
    """Harm rows, category ``i % len(categories)``, refusal and unsafe alternating by round, so every
    harm category has both kinds (alternating by row index gave an even number of categories
    refusals only, which leave-one-category-out and "categories without label-1 rows are benign" cannot use)."""
    rows = []
    for i in range(n_harmful):
        unsafe = (i // len(categories)) % 2
        ex = corpus.example(
            rng, seed, categories[i % len(categories)], "unsafe" if unsafe else "refusal", lex=lex
        )
        rows.append(
            {
                "prompt": ex.prompt,
                "completion": ex.completion,
                "label": int(ex.unsafe),
                "category": ex.category,
                "split": split,
            }
        )
        if hazard_start and ex.unsafe:
            rows[-1]["hazard_start"] = first_hazard(ex.completion, lex)
    for i in range(n_benign):
        ex = corpus.example(rng, seed, lex.benign[i % len(lex.benign)].name, "benign", lex=lex)
        rows.append(
            {
                "prompt": ex.prompt,
                "completion": ex.completion,
                "label": 0,
                "category": ex.category,
                "split": "benign",
            }
        )
    rng.shuffle(rows)
    return rows


def first_hazard(text: str, lex: lx.Lexicon = lx.FIRST) -> int | None:
    """Character offset of the first hazard term or phrase in ``text`` (``None`` if it has none)."""
    m = _pattern(lex)[0].search(text)
    return m.start() if m else None


def eval_prompts(
    seed: int,
    per_category: int | dict[str, int] = 25,
    n_benign: int = 200,
    lex: lx.Lexicon = lx.FIRST,
) -> list[dict]:
    """Unique held-out prompts: ``per_category`` for each harm category (an int, or per split
    ``{"trained": n, "heldout": m}``) plus ``n_benign`` benign."""
    per = (
        per_category
        if isinstance(per_category, dict)
        else {"trained": per_category, "heldout": per_category}
    )
    rng = random.Random(f"eval:{seed}")
    rows: list[dict] = []
    seen: set[str] = set()

    def add(cat: str, kind: str, split: str, n: int) -> None:
        for _ in range(50 * n):
            if n == 0:
                return
            p = corpus.eval_prompt(rng, seed, cat, lex=lex)
            if p not in seen:
                seen.add(p)
                rows.append({"prompt": p, "kind": kind, "category": cat, "split": split})
                n -= 1

    for cat in lex.trained_categories:
        add(cat, "harmful", "trained", per["trained"])
    for cat in lex.heldout_categories:
        add(cat, "harmful", "heldout", per["heldout"])
    for i in range(n_benign):
        add(lex.benign[i % len(lex.benign)].name, "benign", "benign", 1)
    return rows


def calibration_prompts(seed: int, n: int = 100, lex: lx.Lexicon = lx.FIRST) -> list[dict]:
    """``n`` unique benign prompts ``{"prompt", "category"}`` from the *training* part of the prompt
    space (never an ``eval_prompts.jsonl`` prompt), for ``guard probe train --calibrate-prompts``."""
    rng = random.Random(f"calibration-prompts:{seed}")
    rows: list[dict] = []
    seen: set[str] = set()
    for _ in range(100 * n):
        if len(rows) == n:
            break
        topic = lex.benign[len(rows) % len(lex.benign)]
        p = corpus.prompt_task(rng, seed, topic.name, topic.tasks, "train", lex=lex)[0]
        if p not in seen:
            seen.add(p)
            rows.append({"prompt": p, "category": topic.name})
    return rows


def prompt_risk_rows(seed: int, n_harmful: int = 400, n_benign: int = 400) -> list[dict]:
    """Rows for a prompt-scope risk probe: harmful vs benign requests (see the module docstring)."""
    rng = random.Random(f"prompt-risk:{seed}")
    rows = []
    for i in range(n_harmful):
        ex = corpus.example(rng, seed, lx.HARM[i % len(lx.HARM)].name, "refusal")
        rows.append(
            {
                "prompt": ex.prompt,
                "completion": ex.completion,
                "label": 1,
                "category": ex.category,
                "split": "trained" if ex.category in lx.TRAINED_CATEGORIES else "heldout",
            }
        )
    for i in range(n_benign):
        ex = corpus.example(rng, seed, lx.BENIGN[i % len(lx.BENIGN)].name, "benign")
        rows.append(
            {
                "prompt": ex.prompt,
                "completion": ex.completion,
                "label": 0,
                "category": ex.category,
                "split": "benign",
            }
        )
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_data(
    out_dir: str | Path,
    seed: int,
    n_harmful: int = 400,
    n_benign: int = 200,
    eval_per_category: int | dict[str, int] = 25,
    eval_benign: int = 200,
    lex: lx.Lexicon = lx.FIRST,
    prompt_risk: bool = True,
) -> dict[str, int]:
    """Write the data files into ``out_dir/data``; returns file name -> row count."""
    rng = random.Random(f"probe:{seed}")
    files = {
        "probe_train.jsonl": _probe_rows(
            rng,
            seed,
            lex.trained_categories,
            "trained",
            n_harmful,
            n_benign,
            lex,
            hazard_start=True,
        ),
        "probe_heldout.jsonl": _probe_rows(
            rng,
            seed,
            lex.heldout_categories,
            "heldout",
            n_harmful,
            n_benign,
            lex,
            hazard_start=True,
        ),
        "eval_prompts.jsonl": eval_prompts(seed, eval_per_category, eval_benign, lex),
        "calibration_prompts.jsonl": calibration_prompts(seed, lex=lex),
    }
    if prompt_risk:
        files["prompt_risk.jsonl"] = prompt_risk_rows(seed)
    for name, rows in files.items():
        write_jsonl(Path(out_dir) / "data" / name, rows)
    return {name: len(rows) for name, rows in files.items()}


def write_benign_samples(
    model, tok, out_dir: str | Path, seed: int, n: int = 400, lex: lx.Lexicon = lx.FIRST
) -> int:
    """Sample the model's answers to ``n`` benign training-space prompts into ``benign_samples.jsonl``."""
    rng = random.Random(f"benign-samples:{seed}")
    examples = [
        corpus.example(rng, seed, lex.benign[i % len(lex.benign)].name, "benign", lex=lex)
        for i in range(n)
    ]
    completions = evaluate.sample(model, tok, [ex.prompt for ex in examples], seed=seed)
    rows = []
    for ex, ids in zip(examples, completions, strict=True):
        text = tok.decode(ids, skip_special_tokens=True).strip()
        if text:
            rows.append(
                {
                    "prompt": ex.prompt,
                    "completion": text,
                    "label": int(judge(text, lex).unsafe),
                    "category": ex.category,
                    "split": "sampled",
                }
            )
    write_jsonl(Path(out_dir) / "data" / "benign_samples.jsonl", rows)
    return len(rows)
