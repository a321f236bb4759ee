"""``guard sae train`` and ``guard sae features``.

:func:`add_cli` registers the ``sae`` subcommand on the main parser's subparsers. Tables go to
stdout, progress to stderr; errors are :class:`guard.errors.GuardError`. Activations go through
the same on-disk cache as ``guard probe`` (``--cache-dir``, ``--no-cache``).

``sae train`` needs only a model, data and an output directory: the layer defaults to the middle
one (:func:`default_layer`), the width to :data:`DEFAULT_EXPANSION` times ``d_model`` and the
architecture to TopK with :data:`DEFAULT_K` active latents (EleutherAI/sparsify's defaults, not
tuned on guard's data). The modules that load torch are imported when a command runs, so that
building the parser (every ``guard`` invocation) stays cheap.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from guard.errors import InvalidRequestError
from guard.probe_cli import format_table

DEFAULT_EXPANSION = 32
"""Latents per model dimension when ``--d-sae`` is not given (sparsify's ``expansion_factor``)."""
DEFAULT_K = 32
"""Active latents per token of the default TopK SAE (sparsify's ``k``), capped at ``d_sae``."""


def default_layer(num_layers: int) -> int:
    """The middle layer: SAEs and probes read mid-depth residual streams best in most reports."""
    return num_layers // 2


def default_d_sae(d_model: int, expansion: int = DEFAULT_EXPANSION) -> int:
    """The SAE width for a model of width ``d_model``."""
    return expansion * d_model


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``sae train`` and ``sae features`` on ``subparsers``."""
    from guard.probe_cli import _add_model_args

    sae = subparsers.add_parser(
        "sae", help="train sparse autoencoders and find features to monitor"
    )
    sub = sae.add_subparsers(dest="sae_command", required=True)

    t = sub.add_parser("train", help="train a TopK or ReLU+L1 SAE on one layer's residual stream")
    _add_model_args(t)
    t.add_argument(
        "--data",
        required=True,
        action="extend",
        nargs="+",
        metavar="FILE",
        help="JSONL rows {prompt, completion, label}; prompt and completion tokens are trained on",
    )
    t.add_argument(
        "--layer",
        type=int,
        default=None,
        help="engine layer (output of block L: blocks.L.hook_resid_post); default: the middle layer",
    )
    t.add_argument(
        "--d-sae",
        type=int,
        default=None,
        help=f"number of latents; default: {DEFAULT_EXPANSION} x d_model",
    )
    t.add_argument("--out", required=True, help="directory to write (SAELens layout)")
    g = t.add_mutually_exclusive_group()
    g.add_argument(
        "--k",
        type=int,
        help=f"TopK SAE with k active latents per token (default: TopK, k {DEFAULT_K} "
        "or d_sae if smaller)",
    )
    g.add_argument("--l1", type=float, help="ReLU SAE with this L1 coefficient")
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--batch-size", type=int, default=1024)
    t.add_argument("--lr", type=float, default=None, help="default 2e-4 / sqrt(d_sae / 16384)")
    t.add_argument(
        "--heldout-frac", type=float, default=0.1, help="rows held out for the reported metrics"
    )
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_train)

    f = sub.add_parser(
        "features", help="rank SAE features by how well they separate label 1 from label 0"
    )
    f.add_argument("--sae", required=True, help="SAE directory or file (any format guard reads)")
    _add_model_args(f)
    f.add_argument("--data", required=True, action="extend", nargs="+", metavar="FILE")
    f.add_argument(
        "--layer", type=int, default=None, help="engine layer, for SAE files that name no hook"
    )
    f.add_argument("--top", type=int, default=20, help="features in the table (default 20)")
    f.add_argument(
        "--examples", type=int, default=5, help="top-activating examples per feature (default 5)"
    )
    f.add_argument(
        "--examples-for", type=int, default=5, help="show examples for this many top features"
    )
    f.add_argument(
        "--watch", type=int, default=3, help="features in the stanza (the best by AUROC, default 3)"
    )
    f.add_argument(
        "--target-fpr", type=float, default=0.01, help="row-level FPR of the stanza (default 0.01)"
    )
    f.add_argument("--name", default="sae-features", help="monitor name in the stanza")
    f.add_argument(
        "--out-stanza",
        default=None,
        metavar="FILE",
        help="write a policy monitor entry (YAML); its path is relative to FILE's directory",
    )
    f.set_defaults(func=cmd_features)
    return sae


def _engine(args):
    from guard.engine.transformers_engine import TransformersEngine

    return TransformersEngine.load(args.model, dtype=args.dtype, device=args.device)


def cmd_train(args) -> int:
    from guard.probe.collect import collect
    from guard.probe.data import read_files
    from guard.probe.train import split_rows
    from guard.probe_cli import activation_cache
    from guard.sae.formats import save_saelens
    from guard.sae.train import SaeTrainConfig, train_sae

    engine = _engine(args)
    info = engine.info
    layer = default_layer(info.num_layers) if args.layer is None else args.layer
    if not 0 <= layer < info.num_layers:
        raise InvalidRequestError(
            f"layer {layer} out of range: the model has {info.num_layers} layers", param="layer"
        )
    d_sae = default_d_sae(info.d_model) if args.d_sae is None else args.d_sae
    k = min(DEFAULT_K, d_sae) if args.k is None and args.l1 is None else args.k
    try:
        config = SaeTrainConfig(
            d_sae=d_sae,
            k=k,
            l1=args.l1,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
        )
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from exc
    acts = collect(
        engine,
        read_files(args.data),
        [layer],
        desc="data",
        progress=not args.quiet,
        span="all",
        cache=activation_cache(args),
    )
    train_idx, held_idx = split_rows(acts.labels, args.heldout_frac, args.seed)
    x = acts.select(train_idx).hidden[layer]
    eval_x = acts.select(held_idx).hidden[layer]
    hook = f"blocks.{layer}.hook_resid_post"
    res = train_sae(x, config, eval_x=eval_x, layer=layer, hook_name=hook, progress=not args.quiet)
    meta = {
        "guard_training": {
            "data": [
                {"path": str(p), "sha256": hashlib.sha256(Path(p).read_bytes()).hexdigest()}
                for p in args.data
            ],
            "train_tokens": len(x),
            "heldout_tokens": len(eval_x),
            "steps": config.steps,
            "batch_size": config.batch_size,
            "lr": config.learning_rate,
            "seed": config.seed,
            "l1": config.l1,
            "heldout": res.final._asdict(),
            "dead_frac_train": res.dead_frac_train,
        }
    }
    out = save_saelens(
        res.sae, args.out, model_name=engine.info.name, hook_name=hook, extra_cfg={"metadata": meta}
    )
    kind = f"TopK k={config.k}" if config.k is not None else f"ReLU l1={config.l1}"
    print(
        f"SAE {kind}, d_in {res.sae.d_in}, d_sae {config.d_sae}, layer {layer} ({hook}), "
        f"{len(x)} train / {len(eval_x)} held-out tokens, {config.steps} steps, seed {config.seed}"
    )
    print(format_stats([("init", res.initial), ("trained", res.final)]))
    print(f"dead latents (never active on the training tokens): {100 * res.dead_frac_train:.1f}%")
    print(f"-> {out}")
    return 0


def format_stats(rows) -> str:
    lines = [["held-out", "MSE", "FVE", "L0", "dead"]]
    lines += [
        [label, f"{s.mse:.4g}", f"{s.fve:.4f}", f"{s.l0:.1f}", f"{100 * s.dead_frac:.1f}%"]
        for label, s in rows
    ]
    return format_table(lines)


def cmd_features(args) -> int:
    from guard.probe.collect import collect
    from guard.probe.data import read_files
    from guard.probe_cli import activation_cache
    from guard.sae import features as F
    from guard.sae.formats import load_sae

    sae = load_sae(args.sae, layer=args.layer)
    if sae.layer is None:
        raise InvalidRequestError(f"{args.sae} names no hook point; pass --layer", param="layer")
    engine = _engine(args)
    if sae.d_in != engine.info.d_model or sae.layer >= engine.info.num_layers:
        raise InvalidRequestError(
            f"the SAE reads {sae.d_in}-dim layer {sae.layer}; the model has d_model "
            f"{engine.info.d_model} and {engine.info.num_layers} layers"
        )
    acts = collect(
        engine,
        read_files(args.data),
        [sae.layer],
        desc="data",
        progress=not args.quiet,
        cache=activation_cache(args),
    )
    if acts.labels.all() or not acts.labels.any():
        raise InvalidRequestError("feature ranking needs rows of both labels", param="data")
    row_max, rate = F.row_max_acts(sae, acts, sae.layer)
    ranked = F.rank_features(row_max, acts.labels, rate)
    print(
        f"SAE {args.sae}: {sae.activation}, d_sae {sae.d_sae}, layer {sae.layer}; {acts.n_rows} rows "
        f"({int(acts.labels.sum())} pos / {int((acts.labels == 0).sum())} neg), row statistic = max over "
        "completion tokens"
    )
    print(format_ranking(ranked[: args.top]))
    token_text = getattr(engine.tokenizer, "token_text", lambda t: engine.tokenizer.decode([t]))
    for r in ranked[: min(args.examples_for, args.top)] if args.examples else []:
        print(
            f"\nfeature {r.index} (AUROC {r.auroc:.4f}): top activating rows, peak token in [[...]]"
        )
        for ex in F.top_examples(sae, acts, sae.layer, r.index, token_text, n=args.examples):
            print(f"  {ex.activation:8.3f}  label {ex.label}  ...{ex.text}...")
    watch = [r.index for r in ranked[: args.watch]]
    neg = row_max[acts.labels == 0][:, watch]
    thr, fpr = F.joint_thresholds(neg, args.target_fpr)
    scores = F.any_rule_scores(row_max[:, watch], thr)
    tpr = float((scores[acts.labels == 1] > 1.0).mean())
    summary = (
        f"rule any over features {watch}: TPR {100 * tpr:.1f}% at FPR {100 * fpr:.1f}% on this data "
        f"(target {100 * args.target_fpr:g}%), AUROC {F.M.auroc(scores, acts.labels):.4f}"
    )
    print(f"\n{summary}")
    if args.out_stanza:
        out = Path(args.out_stanza)
        entry = F.stanza(args.name, args.sae, sae.layer, watch, thr, relative_to=out.parent)
        comment = (
            f"guard sae features on {', '.join(map(str, args.data))}\n{summary}\n"
            "paste under `monitors:`; path is relative to this file's directory, as in a policy"
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(F.stanza_yaml(entry, comment))
        print(f"stanza -> {out}")
    return 0


def format_ranking(ranked) -> str:
    lines = [["feature", "AUROC", "mean act pos", "mean act neg", "firing rate"]]
    lines += [
        [
            str(r.index),
            f"{r.auroc:.4f}",
            f"{r.mean_pos:.3f}",
            f"{r.mean_neg:.3f}",
            f"{100 * r.firing_rate:.2f}%",
        ]
        for r in ranked
    ]
    return format_table(lines)
