"""Build the model organism: corpus -> tokenizer -> model -> data files -> measurements.

Output directory layout (loadable with ``AutoTokenizer`` / ``AutoModelForCausalLM``)::

    OUT/config.json, model.safetensors, generation_config.json     the trained LlamaForCausalLM
    OUT/tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja
    OUT/data/probe_train.jsonl, probe_heldout.jsonl, eval_prompts.jsonl   (see guard.organism.data)
    OUT/organism.json                                              seed, category split, sizes, metrics

Contract: everything but the timings in ``organism.json`` is a deterministic function of
``seed``, ``steps`` and ``quick`` on a given software stack (``model.safetensors`` is
byte-identical across runs).
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
from guard.organism import lexicon as lx
from guard.organism import tokenizer as toks
from guard.organism.train import ModelShape, TrainConfig, train

DEFAULT_STEPS = 700
DELIBERATION_SHARE = 0.25
"""Deliberation examples per plain example (0.25: they are 20% of the corpus)."""
QUICK_SHAPE = ModelShape(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                         max_position_embeddings=256)


class BuildReport(NamedTuple):
    """What :func:`build` did."""

    out_dir: Path
    seconds: float
    """Wall-clock time of the whole build, evaluation included."""
    final_loss: float
    """Mean assistant-token training loss over the last 10% of steps."""
    metrics: dict
    """Behaviour and probe measurements (empty if the build skipped evaluation)."""


def _save(out: Path, model, tok) -> None:
    model.save_pretrained(out)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id, do_sample=True, temperature=1.0, top_p=1.0,
                     top_k=0).save_pretrained(out)
    toks.save(tok, out)


def measure(model, tok, out: Path, seed: int) -> dict:
    """Sample the eval prompts and run the probe check on the data files in ``out/data``."""
    prompts = data.read_jsonl(out / "data" / "eval_prompts.jsonl")
    completions = evaluate.sample(model, tok, [p["prompt"] for p in prompts], seed=seed)
    metrics = evaluate.behaviour(tok, completions, [p["split"] for p in prompts])
    layer = model.config.num_hidden_layers // 2
    metrics["probe"] = evaluate.probe_check(model, tok, data.read_jsonl(out / "data" / "probe_train.jsonl"),
                                            data.read_jsonl(out / "data" / "probe_heldout.jsonl"), layer)
    return metrics


def build(out_dir: str | Path, seed: int = 0, *, steps: int | None = None, quick: bool = False,
          evaluate_model: bool | None = None, log: bool = False) -> BuildReport:
    """Build the organism into ``out_dir`` (created; existing files are overwritten).

    ``quick`` trains a tiny model on a small corpus for a few dozen steps (for tests) and skips
    the evaluation unless ``evaluate_model`` is True.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = QUICK_SHAPE if quick else ModelShape()
    cfg = TrainConfig(steps=steps or (30 if quick else DEFAULT_STEPS), batch_size=8 if quick else 32)
    n_plain = 2_000 if quick else 20_000
    examples = corpus.generate(n_plain, seed) + spec.generate(int(n_plain * DELIBERATION_SHARE), seed)
    texts = ([e.prompt for e in examples] + [e.forced + e.completion for e in examples]
             + list(lx.SYSTEM_PROMPTS))
    tok = toks.to_hf(toks.train_tokenizer(texts, vocab_size=512 if quick else 1536))
    result = train(examples, tok, shape, cfg, seed, log=log)
    _save(out, result.model, tok)
    sizes = data.write_data(out, seed)
    if not quick:
        sizes["benign_samples.jsonl"] = data.write_benign_samples(result.model, tok, out, seed)
    do_eval = (not quick) if evaluate_model is None else evaluate_model
    metrics = measure(result.model, tok, out, seed) if do_eval else {}
    seconds = time.perf_counter() - t0
    meta = {
        "seed": seed, "quick": quick,
        "categories": {"trained": list(lx.TRAINED_CATEGORIES), "heldout": list(lx.HELDOUT_CATEGORIES),
                       "benign_topics": [t.name for t in lx.BENIGN]},
        "model": asdict(shape),
        "train": {**asdict(cfg), "final_loss": result.final_loss, "seconds": result.seconds},
        "sizes": {"corpus_examples": len(examples), "vocab": len(tok),
                  "parameters": sum(p.numel() for p in result.model.parameters()),
                  "model_bytes": (out / "model.safetensors").stat().st_size, "data_rows": sizes},
        "build_seconds": seconds,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "metrics": metrics,
    }
    (out / "organism.json").write_text(json.dumps(meta, indent=2) + "\n")
    return BuildReport(out, seconds, result.final_loss, metrics)


def _cmd_build(args: argparse.Namespace) -> int:
    report = build(args.out, args.seed, steps=args.steps, quick=args.quick, log=True)
    print(json.dumps({"out_dir": str(report.out_dir), "seconds": round(report.seconds, 1),
                      "final_loss": report.final_loss, "metrics": report.metrics}, indent=2))
    return 0


def _cmd_judge(args: argparse.Namespace) -> int:
    from guard.organism.judge import is_refusal, judge

    text = args.text if args.text is not None else __import__("sys").stdin.read()
    v = judge(text)
    print(json.dumps({"unsafe": v.unsafe, "category": v.category, "terms": v.terms,
                      "refusal": is_refusal(text)}))
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``guard organism build OUT [--seed N] [--steps N] [--quick]`` and
    ``guard organism judge [TEXT]`` (reads stdin without TEXT). Each sets ``func(args) -> int``."""
    p = subparsers.add_parser("organism", help="build or inspect the embedded model organism")
    sub = p.add_subparsers(dest="organism_command", required=True)
    b = sub.add_parser("build", help="train the organism from scratch into OUT")
    b.add_argument("out", help="output directory")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--steps", type=int, default=None, help=f"training steps (default {DEFAULT_STEPS})")
    b.add_argument("--quick", action="store_true", help="tiny model, few steps, no evaluation")
    b.set_defaults(func=_cmd_build)
    j = sub.add_parser("judge", help="ground-truth verdict for a completion text")
    j.add_argument("text", nargs="?", default=None)
    j.set_defaults(func=_cmd_judge)
