"""``guard probe train``, ``guard probe eval`` and ``guard probe promote``.

:func:`add_cli` registers the ``probe`` subcommand on the main parser's subparsers and sets
``func`` on each leaf; ``guard`` (:mod:`guard.cli`) is the entry point.
Tables go to stdout, progress to stderr; errors are :class:`guard.errors.GuardError`.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from guard import judge as judges
from guard.errors import InvalidRequestError
from guard.monitors.base import AggregationSpec


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer numbers, got {text!r}"
        ) from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local HF model directory")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="activation cache (default $GUARD_CACHE_DIR or ~/.cache/guard/activations)",
    )
    p.add_argument(
        "--no-cache", action="store_true", help="always run the model; read and write no cache"
    )


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``probe train``, ``eval`` and ``promote`` on ``subparsers`` (from ``add_subparsers()``)."""
    probe = subparsers.add_parser("probe", help="train and evaluate linear probe monitors")
    sub = probe.add_subparsers(dest="probe_command", required=True)

    t = sub.add_parser(
        "train",
        help="train a probe; layer, aggregation, method and token labels not given are "
        "chosen by cross-validation (leave one harm category out when rows carry "
        "'category')",
    )
    _add_model_args(t)
    t.add_argument(
        "--data",
        required=True,
        action="extend",
        nargs="+",
        metavar="FILE",
        help='JSONL rows {"prompt", "completion", "label": 0|1}, optionally "category" (cross-validation '
        'then leaves one harm category out at a time) and "hazard_start" (label-1 rows: where the '
        'harm begins); split 80/20 into train/held-out, except reviewed rows ("source": "review", '
        "from `guard logs export --labelled`), always trained on; their negatives also join "
        "calibration",
    )
    t.add_argument(
        "--eval",
        action="extend",
        nargs="+",
        default=[],
        metavar="FILE",
        help="extra held-out data (e.g. held-out categories), reported separately",
    )
    t.add_argument(
        "--calibration",
        action="extend",
        nargs="+",
        default=[],
        metavar="FILE",
        help="calibrate the threshold on these rows' negatives instead of on sampled answers",
    )
    t.add_argument(
        "--calibrate-prompts",
        default=None,
        metavar="FILE",
        help='JSONL of benign prompts ({"prompt": ...} or {"messages": [...]}): the CLI samples the '
        "model's own answers to them and calibrates the threshold so a --fpr-confidence upper bound "
        "on the share of such whole answers that would fire, as live, is at most --target-fpr "
        "(default: the prompts of --data's benign-category rows when rows carry categories, else "
        "the negatives of --data)",
    )
    t.add_argument(
        "--samples", type=int, default=4, help="answers sampled per calibration prompt (default 4)"
    )
    judges.add_arguments(
        t,
        required=False,
        what="drop the sampled calibration answers this judge calls unsafe (a benign prompt's "
        "answer may itself be harmful; as a negative it would push the threshold above it)",
    )
    t.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="sampling temperature of the calibration answers; use your policy's (default 1.0)",
    )
    t.add_argument(
        "--max-tokens", type=int, default=96, help="longest calibration answer (default 96)"
    )
    t.add_argument("--out", required=True, help="probe directory to write")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--layer", type=int, help="train at this layer only")
    g.add_argument(
        "--layers",
        type=_layers,
        help="choose among these layers, e.g. 4,6,8 (default: all, at most 8 "
        "spread evenly in cross-validation)",
    )
    t.add_argument(
        "--method",
        choices=["logreg", "diffmean"],
        default=None,
        help="default: chosen by cross-validation",
    )
    t.add_argument(
        "--labels",
        choices=["all", "from-hazard", "to-hazard"],
        default=None,
        help="which tokens of a positive completion are positive (from-hazard/to-hazard need rows with "
        "'hazard_start'; default: chosen by cross-validation)",
    )
    t.add_argument(
        "--folds",
        type=int,
        default=5,
        help="k of the k-fold cross-validation used when rows have no 'category' (default 5)",
    )
    t.add_argument(
        "--pooling",
        choices=["token", "mean", "last"],
        default="token",
        help="fit on every completion token, or on one mean/last-token vector per row (default token)",
    )
    t.add_argument(
        "--span",
        choices=["completion", "prompt"],
        default="completion",
        help="tokens the probe reads: completion (output monitor) or prompt (prompt-scope monitor; "
        "labels mark harmful requests) (default completion)",
    )
    t.add_argument("--l2", type=float, default=0.1, help="L2 penalty for logreg (default 0.1)")
    t.add_argument(
        "--target-fpr",
        type=float,
        default=0.01,
        help="false-fire rate on benign answers the threshold must hold (default 0.01)",
    )
    t.add_argument(
        "--fpr-confidence",
        type=float,
        default=0.9,
        help="confidence of the one-sided (Clopper-Pearson) bound that must meet --target-fpr: the "
        "threshold holds the target on new answers with this probability (default 0.9)",
    )
    t.add_argument("--heldout-frac", type=float, default=0.2)
    t.add_argument("--seed", type=int, default=0)
    _add_aggregation_args(t, default=None, chosen=True)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser(
        "eval",
        help="row-level metrics of a saved probe on labelled data; several probes "
        "(--probe OLD --probe NEW) side by side",
    )
    e.add_argument("probe_dir", metavar="PROBE_DIR", nargs="?")
    e.add_argument(
        "--probe",
        action="append",
        default=[],
        metavar="PROBE_DIR",
        help="a probe to compare (repeat: before/after on the same rows, e.g. reviewed ones)",
    )
    _add_model_args(e)
    e.add_argument("--data", required=True, action="extend", nargs="+", metavar="FILE")
    e.add_argument("--target-fpr", type=float, default=None, help="default: the probe's")
    e.add_argument(
        "--png",
        default=None,
        metavar="OUT.png",
        help="write a histogram of row scores per class (blue: label 0, orange: label 1; red: threshold)",
    )
    _add_aggregation_args(e, default=None)
    e.set_defaults(func=cmd_eval)

    pr = sub.add_parser(
        "promote",
        help="point a policy's probe monitor at a new probe, in place (a running "
        "`guard serve` hot-reloads it)",
    )
    pr.add_argument("probe_dir", metavar="PROBE_DIR")
    pr.add_argument("--policy", required=True, metavar="FILE", help="policy file to edit")
    pr.add_argument("--monitor", required=True, help="name of the probe monitor to update")
    pr.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="pin this threshold in the policy (default: the probe file's; a threshold the policy "
        "sets is replaced by the new probe's)",
    )
    pr.add_argument(
        "--action",
        choices=["backtrack", "refuse", "shadow"],
        default=None,
        help="also set the monitor's action (e.g. backtrack once a shadow monitor has been reviewed)",
    )
    pr.set_defaults(func=cmd_promote)
    return probe


def _add_aggregation_args(
    p: argparse.ArgumentParser, default: str | None, chosen: bool = False
) -> None:
    what = "chosen by cross-validation" if chosen else "the probe's"
    p.add_argument(
        "--aggregation",
        choices=["none", "ema", "window"],
        default=default,
        help="per-token score aggregation"
        + (f" (default {default})" if default else f" (default: {what})"),
    )
    p.add_argument(
        "--alpha", type=float, default=0.5, help="EMA weight of the newest token (default 0.5)"
    )
    p.add_argument(
        "--window", type=int, default=4, help="window length for --aggregation window (default 4)"
    )


def _aggregation(args) -> AggregationSpec | None:
    if args.aggregation is None:
        return None
    return AggregationSpec(kind=args.aggregation, alpha=args.alpha, window=args.window)


def _engine(args):
    from guard.engine.transformers_engine import TransformersEngine

    return TransformersEngine.load(args.model, dtype=args.dtype, device=args.device)


def activation_cache(args):
    """The activation cache the model/cache arguments ask for, or ``None`` with ``--no-cache``."""
    from guard.probe.cache import ActivationCache

    return None if args.no_cache else ActivationCache(args.cache_dir, args.model)


def cmd_train(args) -> int:
    from guard.probe.train import CalibrationSampling, TrainConfig, train_probe

    try:
        config = TrainConfig(
            method=args.method,
            l2=args.l2,
            target_fpr=args.target_fpr,
            fpr_confidence=args.fpr_confidence,
            heldout_frac=args.heldout_frac,
            seed=args.seed,
            aggregation=_aggregation(args),
            pooling=args.pooling,
            span=args.span,
            token_labels=args.labels,
            alpha=args.alpha,
            window=args.window,
            folds=args.folds,
        )
        sampling = CalibrationSampling(
            n=args.samples, temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed
        )
        sampling.params()
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from exc
    judge = judges.from_args(args)
    engine = _engine(args)
    layers = [args.layer] if args.layer is not None else args.layers
    result = train_probe(
        engine,
        args.data,
        model_dir=args.model,
        layers=layers,
        eval_data=args.eval,
        calibration=args.calibration,
        config=config,
        name=Path(args.out).name,
        progress=not args.quiet,
        cache=activation_cache(args),
        calibrate_prompts=args.calibrate_prompts,
        sampling=sampling,
        judge=judge,
    )
    mon = result.monitor
    m = mon.meta["metrics"]
    if len(result.sweep) > 1:
        print(format_sweep(m["sweep"], mon.layer, config.target_fpr))
        print(
            "(per layer with the chosen method, labels and aggregation: fitted on the train split, scored on "
            "the held-out split; * = the layer cross-validation chose)"
        )
        print()
    if m["selection"]["folds"] is not None:
        print(format_selection(m["selection"], config.target_fpr))
        print()
    out = mon.save(args.out)
    cal = m["calibration"]
    print(
        f"probe: layer {mon.layer}, method {mon.meta['method']}, labels {mon.meta['token_labels']}, "
        f"pooling {config.pooling}, aggregation {_agg_text(mon.aggregation)}"
        f" -> {out}"
    )
    print(
        f"threshold {mon.threshold:.6g}: FPR {_pct(cal['fpr_at_threshold'])} on {cal['negatives']} "
        f"calibration negatives ({cal['source'] if isinstance(cal['source'], str) else ', '.join(cal['source'])})"
    )
    print(format_bound(cal, config.target_fpr))
    if "highest" in cal:
        print(format_highest(cal))
    print(format_metrics("held-out", m["heldout"]))
    if m["eval"] is not None:
        print(format_metrics("eval", m["eval"]))
    return 0


def format_bound(cal: dict, target_fpr: float) -> str:
    """The calibration's confidence bound on the false-fire rate, and a warning when it misses."""
    conf = f"{100 * cal['confidence']:g}%"
    line = (
        f"false fires on new benign answers: <= {100 * cal['fpr_upper_bound']:.2f}% with {conf} "
        f"confidence (one-sided Clopper-Pearson on {cal['negatives']} calibration answers; "
        f"target {100 * target_fpr:g}%)"
    )
    if target_fpr == 0.0:
        line += (
            f"\ntarget 0: the threshold is the highest of the {cal['negatives']} calibration "
            "answers (none of them fires); no number of answers bounds a rate of 0 on new ones."
        )
    elif not cal["meets_target"]:
        line += (
            f"\nwarning: {cal['negatives']} calibration answers are too few to hold the target with "
            f"{conf} confidence (need >= {cal['negatives_needed']}); the threshold is their maximum. "
            "Give more prompts (--calibrate-prompts) or --samples."
        )
    return line


def format_highest(cal: dict) -> str:
    """What the judge dropped from calibration, and the highest-scoring sampled answers that remain:
    the ones the threshold was set against, for the user to read."""
    from guard.probe.train import clip

    lines = []
    if cal["judge"] is not None:
        dropped = cal["excluded_unsafe"]
        lines.append(
            f"{cal['judge']}: {dropped['count']} sampled calibration answer(s) called unsafe, "
            "left out of cross-validation and calibration"
            + (f", e.g. {dropped['examples'][0]!r}" if dropped["examples"] else "")
        )
    lines.append(
        "highest-scoring sampled calibration answers (the threshold is set against these; if one "
        "is harmful, train again with a judge that calls it unsafe: --judge, --judge-regex or "
        "--judge-words):"
    )
    lines += [
        f"  {h['score']:.6g}{' fires' if h['fires'] else ''}  {clip(h['text'], 120)!r}"
        for h in cal["highest"]
    ]
    return "\n".join(lines)


def cmd_eval(args) -> int:
    from guard.monitors.probe import ProbeMonitor
    from guard.probe.collect import collect
    from guard.probe.data import read_files

    dirs = ([args.probe_dir] if args.probe_dir else []) + args.probe
    if not dirs:
        raise InvalidRequestError(
            "name a probe: guard probe eval PROBE_DIR ... or --probe OLD --probe NEW", param="probe"
        )
    if args.png and len(dirs) > 1:
        raise InvalidRequestError("--png draws one probe's histogram; give one probe", param="png")
    try:
        aggregation = _aggregation(args)
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from exc
    mons = [ProbeMonitor.load(d, name=Path(d).name, aggregation=aggregation) for d in dirs]
    spans = {m.meta.get("span", "completion") for m in mons}
    if len(spans) > 1:
        raise InvalidRequestError(
            f"the probes read different spans ({', '.join(sorted(spans))}); compare probes "
            "of one kind",
            param="probe",
        )
    engine = _engine(args)
    for mon in mons:
        mon.check_compatible(engine.info, model_dir=args.model)
    acts = collect(
        engine,
        read_files(args.data),
        {m.layer for m in mons},
        desc="data",
        progress=not args.quiet,
        cache=activation_cache(args),
        span=spans.pop(),
    )
    if len(mons) > 1:
        print(format_comparison(dirs, mons, acts))
        return 0
    _print_eval(args, dirs[0], mons[0], acts)
    return 0


def _print_eval(args, probe_dir: str, mon, acts) -> None:
    from guard.probe.train import evaluate, row_scores

    target = args.target_fpr if args.target_fpr is not None else mon.meta.get("target_fpr", 0.01)
    print(
        f"probe {probe_dir}: layer {mon.layer}, aggregation {mon.aggregation.kind}, threshold {mon.threshold:.6g}"
    )
    print(format_metrics("data", evaluate(mon, acts, target)))
    if args.png:
        from guard.probe.png import histogram_image, write_png

        _, rows = row_scores(mon, acts)
        write_png(args.png, histogram_image(rows, acts.labels, mon.threshold))
        print(
            f"histogram of {acts.n_rows} row scores -> {args.png} "
            "(blue: label 0, orange: label 1, red line: threshold)"
        )


def format_comparison(dirs: list[str], mons: list, acts) -> str:
    """Probes side by side on the same rows, each at its own threshold: positives caught, false
    positives fired, AUROC."""
    from guard.probe.train import decisions

    ds = [decisions(m, acts) for m in mons]
    lines = [
        ["", *dirs],
        ["layer", *(str(m.layer) for m in mons)],
        ["threshold", *(f"{m.threshold:.6g}" for m in mons)],
        ["positives caught", *(f"{d['caught']}/{d['positives']}" for d in ds)],
        ["false positives fired", *(f"{d['false_positives']}/{d['negatives']}" for d in ds)],
        ["AUROC", *(_num(d["auroc"]) for d in ds)],
    ]
    return (
        f"{acts.n_rows} rows ({ds[0]['positives']} pos / {ds[0]['negatives']} neg)\n"
        + format_table(lines)
    )


def cmd_promote(args) -> int:
    from guard.loop import promote_probe

    done = promote_probe(
        args.probe_dir, args.policy, args.monitor, threshold=args.threshold, action=args.action
    )
    how = "pinned in the policy" if done.threshold is not None else "the probe file's"
    print(
        f"{done.policy_file}: monitor {done.monitor} -> probe {done.path}, threshold {done.effective_threshold:.6g} "
        f"({how}), action {done.action}; policy sha256 {done.policy_hash[:12]}"
    )
    for w in done.warnings:
        print(f"warning: {w}")
    print("a running `guard serve` with this policy reloads it within its --reload-interval")
    return 0


def _pct(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def _num(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def format_metrics(label: str, m: dict) -> str:
    fpr = f"{100 * m['target_fpr']:g}%"
    return (
        f"{label}: {m['rows']} rows ({m['positives']} pos / {m['negatives']} neg)  AUROC {_num(m['auroc'])}  "
        f"TPR@{fpr}FPR {_pct(m['tpr_at_target_fpr'])}  token AUROC {_num(m['token_auroc'])}  "
        f"at threshold: TPR {_pct(m['tpr_at_threshold'])} FPR {_pct(m['fpr_at_threshold'])}"
    )


def format_sweep(rows: list[dict], chosen: int, target_fpr: float) -> str:
    """The layer-sweep table; ``*`` marks the chosen layer."""
    fpr = f"{100 * target_fpr:g}%"
    head = ["layer", "AUROC", f"TPR@{fpr}FPR", "token AUROC"]
    has_eval = any(r["eval_auroc"] is not None for r in rows)
    if has_eval:
        head += ["eval AUROC", f"eval TPR@{fpr}FPR"]
    lines = [head]
    for r in rows:
        line = [
            f"{r['layer']}{' *' if r['layer'] == chosen else ''}",
            _num(r["heldout_auroc"]),
            _pct(r["heldout_tpr_at_target_fpr"]),
            _num(r["heldout_token_auroc"]),
        ]
        if has_eval:
            line += [_num(r["eval_auroc"]), _pct(r["eval_tpr_at_target_fpr"])]
        lines.append(line)
    return format_table(lines)


def _agg_text(agg) -> str:
    kind = agg["kind"] if isinstance(agg, dict) else agg.kind
    alpha = agg["alpha"] if isinstance(agg, dict) else agg.alpha
    window = agg["window"] if isinstance(agg, dict) else agg.window
    return {"none": "none", "ema": f"ema({alpha:g})", "window": f"window({window})"}[kind]


def format_selection(sel: dict, target_fpr: float, top: int = 12) -> str:
    """The cross-validation table (best ``top`` candidates, chosen first), the token-label comparison
    at the chosen layer / method / aggregation, and the criterion."""
    fpr = f"{100 * target_fpr:g}%"
    how = (
        "leave-one-category-out over " + ", ".join(sel["fold_names"])
        if sel["folds"] == "category"
        else f"{len(sel['fold_names'])}-fold by row (rows carry no categories)"
    )
    head = [
        "",
        "layer",
        "method",
        "labels",
        "aggregation",
        "worst fold",
        f"TPR@{fpr}",
        "worst margin",
        "strict TPR",
        "AUROC",
        "FPR",
    ]

    def line(r: dict, mark: str) -> list[str]:
        return [
            mark,
            str(r["layer"]),
            r["method"],
            r["labels"],
            _agg_text(r["aggregation"]),
            _pct(r["cv_worst_tpr"]),
            _pct(r["cv_tpr"]),
            _num(r.get("cv_worst_margin")),
            _pct(r["cv_strict_tpr"]),
            _num(r["cv_auroc"]),
            _pct(r["cv_fpr"]),
        ]

    table = sel["table"]
    lines = [head] + [line(r, "*" if i == 0 else "") for i, r in enumerate(table[:top])]
    best = table[0]
    same = [
        r
        for r in table
        if r["layer"] == best["layer"]
        and r["method"] == best["method"]
        and r["aggregation"] == best["aggregation"]
    ]
    out = [
        f"cross-validation ({how}); {len(table)} candidates, best {min(top, len(table))} shown:",
        format_table(lines),
    ]
    if len(same) > 1:
        out += [
            "",
            "token labels at the chosen layer, method and aggregation:",
            format_table([head] + [line(r, "*" if r is best else "") for r in same]),
        ]
    out += [
        "",
        f"chosen: {sel['chosen']}",
        f"criterion: {sel['criterion']}",
        (
            f"(worst fold: the left-out category with the lowest TPR; TPR: unsafe rows of the left-out "
            f"category caught at the threshold calibration sets for {fpr} false fires, mean over folds; "
            "worst margin: min over folds of (10% quantile of its unsafe rows - threshold) / "
            "(threshold - median calibration answer), in logits; strict: above every calibration answer)"
        ),
    ]
    return "\n".join(out)


def format_table(lines: list[list[str]]) -> str:
    """Right-aligned columns, two spaces apart; ``lines[0]`` is the header."""
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in lines
    )
