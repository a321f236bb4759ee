"""Build the model organism: corpus -> tokenizer -> model -> data files -> measurements.

Output directory layout (loadable with ``AutoTokenizer`` / ``AutoModelForCausalLM``)::

    OUT/config.json, model.safetensors, generation_config.json     the trained LlamaForCausalLM
    OUT/tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja
    OUT/data/probe_train.jsonl, probe_heldout.jsonl, eval_prompts.jsonl   (see guard.organism.data)
    OUT/organism.json                                              seed, category split, sizes, metrics

Contract: everything but the timings in ``organism.json`` is a deterministic function of the
recipe, ``seed``, ``steps`` and ``quick`` on a given software stack (``model.safetensors`` is
byte-identical across runs). The ``first`` recipe builds exactly what this module built before
recipes existed (:mod:`guard.organism.recipe`).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
import transformers
from transformers import GenerationConfig

from guard.organism import corpus, data, evaluate, spec
from guard.organism import tokenizer as toks
from guard.organism.judge import is_refusal, judge
from guard.organism.recipe import FIRST_RECIPE, RECIPES, Recipe
from guard.organism.train import TrainConfig, train

DEFAULT_STEPS = FIRST_RECIPE.steps
DELIBERATION_SHARE = FIRST_RECIPE.deliberation_share
"""Deliberation examples per plain example (0.25: they are 20% of the corpus)."""
QUICK_SHAPE = FIRST_RECIPE.quick_shape


class BuildReport(NamedTuple):
    """What :func:`build` did."""

    out_dir: Path
    seconds: float
    """Wall-clock time of the whole build, evaluation included."""
    final_loss: float
    """Mean assistant-token training loss over the last 10% of steps."""
    metrics: dict
    """Behaviour and probe measurements (empty if the build skipped evaluation)."""


def _save(out: Path, model, tok, recipe: Recipe = FIRST_RECIPE) -> None:
    model.save_pretrained(out)
    GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
    ).save_pretrained(out)
    toks.save(tok, out, recipe.chat_format)


def measure(model, tok, out: Path, seed: int, recipe: Recipe = FIRST_RECIPE) -> dict:
    """Sample the eval prompts and run the probe check on the data files in ``out/data``."""
    prompts = data.read_jsonl(out / "data" / "eval_prompts.jsonl")
    completions = evaluate.sample(model, tok, [p["prompt"] for p in prompts], seed=seed)
    metrics = evaluate.behaviour(tok, completions, [p["split"] for p in prompts], recipe.lexicon)
    layer = model.config.num_hidden_layers // 2
    metrics["probe"] = evaluate.probe_check(
        model,
        tok,
        data.read_jsonl(out / "data" / "probe_train.jsonl"),
        data.read_jsonl(out / "data" / "probe_heldout.jsonl"),
        layer,
    )
    return metrics


def build(
    out_dir: str | Path,
    seed: int | None = None,
    *,
    steps: int | None = None,
    quick: bool = False,
    evaluate_model: bool | None = None,
    log: bool = False,
    recipe: Recipe | str = FIRST_RECIPE,
) -> BuildReport:
    """Build the organism of ``recipe`` into ``out_dir`` (created; existing files are overwritten).

    ``seed`` defaults to the recipe's. ``quick`` trains a tiny model on a small corpus for a few
    dozen steps (for tests) and skips the evaluation unless ``evaluate_model`` is True.
    """
    t0 = time.perf_counter()
    recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
    seed = recipe.seed if seed is None else seed
    lex = recipe.lexicon
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = recipe.quick_shape if quick else recipe.shape
    cfg = TrainConfig(steps=steps or (30 if quick else recipe.steps), batch_size=8 if quick else 32)
    n_plain = 2_000 if quick else recipe.n_plain
    examples = corpus.generate(n_plain, seed, recipe.corpus, lex=lex)
    if recipe.deliberation_share:
        examples += spec.generate(int(n_plain * recipe.deliberation_share), seed)
    texts = (
        [e.prompt for e in examples]
        + [e.forced + e.completion for e in examples]
        + list(lex.system_prompts)
    )
    if recipe.chat_format is not toks.FIRST_FORMAT:
        texts += ["system\n", "user\n", "assistant\n"]  # the template's own words
    vocab = recipe.quick_vocab_size if quick else recipe.vocab_size
    tok = toks.to_hf(
        toks.train_tokenizer(texts, vocab_size=vocab, fmt=recipe.chat_format), recipe.chat_format
    )
    result = train(examples, tok, shape, cfg, seed, log=log)
    _save(out, result.model, tok, recipe)
    sizes = data.write_data(
        out,
        seed,
        eval_per_category=recipe.eval_per_category,
        lex=lex,
        prompt_risk=recipe.prompt_risk,
    )
    if not quick:
        sizes["benign_samples.jsonl"] = data.write_benign_samples(
            result.model, tok, out, seed, lex=lex
        )
    do_eval = (not quick) if evaluate_model is None else evaluate_model
    metrics = measure(result.model, tok, out, seed, recipe) if do_eval else {}
    seconds = time.perf_counter() - t0
    meta = {
        "recipe": recipe.name,
        "seed": seed,
        "quick": quick,
        "tokenizer": {
            "kind": recipe.chat_format.kind,
            "special_tokens": list(recipe.chat_format.special_tokens),
        },
        "categories": {
            "trained": list(lex.trained_categories),
            "heldout": list(lex.heldout_categories),
            "benign_topics": [t.name for t in lex.benign],
        },
        "model": asdict(shape),
        "train": {**asdict(cfg), "final_loss": result.final_loss, "seconds": result.seconds},
        "sizes": {
            "corpus_examples": len(examples),
            "vocab": len(tok),
            "parameters": sum(p.numel() for p in result.model.parameters()),
            "model_bytes": (out / "model.safetensors").stat().st_size,
            "data_rows": sizes,
        },
        "build_seconds": seconds,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "metrics": metrics,
    }
    (out / "organism.json").write_text(json.dumps(meta, indent=2) + "\n")
    return BuildReport(out, seconds, result.final_loss, metrics)


def _cmd_build(args: argparse.Namespace) -> int:
    report = build(
        args.out, args.seed, steps=args.steps, quick=args.quick, log=True, recipe=args.recipe
    )
    print(
        json.dumps(
            {
                "out_dir": str(report.out_dir),
                "seconds": round(report.seconds, 1),
                "final_loss": report.final_loss,
                "metrics": report.metrics,
            },
            indent=2,
        )
    )
    return 0


def _cmd_judge(args: argparse.Namespace) -> int:
    text = args.text if args.text is not None else __import__("sys").stdin.read()
    lex = RECIPES[args.recipe].lexicon
    v = judge(text, lex)
    print(
        json.dumps(
            {
                "unsafe": v.unsafe,
                "category": v.category,
                "terms": v.terms,
                "refusal": is_refusal(text, lex),
            }
        )
    )
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``guard organism build OUT [--recipe first|second] [--seed N] [--steps N] [--quick]``
    and ``guard organism judge [TEXT] [--recipe ...]`` (reads stdin without TEXT). Each sets ``func(args) -> int``."""
    p = subparsers.add_parser("organism", help="build or inspect the embedded model organism")
    sub = p.add_subparsers(dest="organism_command", required=True)
    b = sub.add_parser("build", help="train the organism from scratch into OUT")
    b.add_argument("out", help="output directory")
    b.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default="first",
        help="which organism: first (models/organism) or second (models/organism2) (default first)",
    )
    b.add_argument(
        "--seed", type=int, default=None, help="default: the recipe's (first 0, second 7)"
    )
    b.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training steps (default: the recipe's; first {DEFAULT_STEPS})",
    )
    b.add_argument("--quick", action="store_true", help="tiny model, few steps, no evaluation")
    b.set_defaults(func=_cmd_build)
    j = sub.add_parser("judge", help="ground-truth verdict for a completion text")
    j.add_argument("text", nargs="?", default=None)
    j.add_argument(
        "--recipe", choices=sorted(RECIPES), default="first", help="whose vocabulary to judge by"
    )
    j.set_defaults(func=_cmd_judge)
