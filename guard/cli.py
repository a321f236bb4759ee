"""The ``guard`` command: serve, build the organism, train probes, read logs, check policies.

Each sub-command lives with the code it drives and registers itself through ``add_cli``;
errors from the library (:class:`guard.errors.GuardError`) are printed without a traceback and
exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from guard.errors import GuardError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_POLICY = REPO_ROOT / "policies" / "demo.yaml"


def _serve(args: argparse.Namespace) -> int:
    import torch

    from guard.telemetry import install_request_log
    from guard.telemetry.export import configure_otlp_tracing
    from server.app import run

    # On CPU, torch's intra-op threads spin against the HTTP event loop for every token; leaving
    # one core to the loop is several times faster for small models (measured: 15 ms -> 3 ms/step).
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    install_request_log()  # one JSON line per request on stderr
    if (otlp := configure_otlp_tracing()) is not None:
        logging.getLogger("guard.telemetry").info("exporting traces over OTLP (%s)", otlp)
    policies = args.policy or [str(DEMO_POLICY)]
    run(
        policies,
        host=args.host,
        port=args.port,
        reload_interval_s=args.reload_interval or None,
        log_content=args.log_content,
        admin_key_env=args.admin_key_env,
        log_url=args.log_url,
        drain_grace_s=args.drain_grace,
    )
    return 0


def _policy_check(args: argparse.Namespace) -> int:
    from guard.policy import format_policy, load_policy
    from guard.policy.model_check import exposure_lines, model_errors, native_reset_line

    failed = False
    for path in args.files:
        try:
            policy = load_policy(path, check_paths=not args.no_path_check)
        except GuardError as exc:
            print(exc, file=sys.stderr)
            failed = True
            continue
        # Against the model's config and tokenizer (no weights): what `guard serve` would refuse.
        errors = [] if args.no_path_check else model_errors(policy)
        if errors:
            print(
                f"invalid policy {path} for its model {policy.model.path}:\n"
                + "\n".join(f"  {path}: {e}" for e in errors),
                file=sys.stderr,
            )
            failed = True
            continue
        print(f"# {path}: ok (sha256 {policy.content_hash[:12]})")
        native, acts = ("", False) if args.no_path_check else native_reset_line(policy)
        print("\n".join(exposure_lines(policy, native_reset=acts)))
        if native:
            print(native)
        print(format_policy(policy))
        if policy.model.engine == "vllm":
            from guard.engine.reset_id import policy_reset_line

            line, bad = policy_reset_line(policy)
            print(line, file=sys.stderr if bad else sys.stdout)
            failed = failed or bad
            if not args.no_path_check:
                from guard.policy.model_check import policy_layout_lines

                print("\n".join(policy_layout_lines(policy)))
    return 2 if failed else 0


def _policy_docs(args: argparse.Namespace) -> int:
    from guard.policy.docs import render_docs

    text = render_docs()
    if args.out is None:
        sys.stdout.write(text)
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from guard.eval.cli import add_cli as add_eval
    from guard.logs_cli import add_cli as add_logs
    from guard.organism.build import add_cli as add_organism
    from guard.probe_cli import add_cli as add_probe
    from guard.sae_cli import add_cli as add_sae

    parser = argparse.ArgumentParser(prog="guard", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve policies as an OpenAI-compatible endpoint")
    serve.add_argument(
        "--policy", action="append", help="policy YAML (repeatable); default: the demo policy"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: cores - 1, leaving one to the HTTP loop)",
    )
    serve.add_argument(
        "--reload-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="check the policy files for edits this often and swap valid ones in (0: never)",
    )
    serve.add_argument(
        "--log-content",
        action="store_true",
        help="put prompt and answer text in the per-request JSON log lines (default: counts and "
        "ids only)",
    )
    serve.add_argument(
        "--admin-key-env",
        metavar="NAME",
        default=None,
        help="environment variable holding the admin key of the review page (/review) and API "
        "(default: GUARD_ADMIN_KEY; without a key they are off)",
    )
    serve.add_argument(
        "--log-url",
        metavar="URL",
        default=None,
        help="one log for every policy, instead of each policy's log target: a SQLite path or "
        "postgresql://USER@HOST:PORT/DB (default: $GUARD_LOG_URL; unset: the policies' own)",
    )
    serve.add_argument(
        "--drain-grace",
        type=float,
        default=None,
        metavar="SECONDS",
        help="on SIGTERM, stop taking requests and let those in flight run this long before "
        "interrupting them (default: $GUARD_DRAIN_GRACE_S, else 30)",
    )
    serve.set_defaults(func=_serve)

    policy = sub.add_parser("policy", help="policy files").add_subparsers(
        dest="policy_command", required=True
    )
    check = policy.add_parser(
        "check",
        help="validate policies against their model's config and tokenizer and "
        "print them resolved with their stream exposure bound; every error "
        "of every file is reported (file:line:col: field: message), exit 2 "
        "on any",
    )
    check.add_argument("files", nargs="+")
    check.add_argument(
        "--no-path-check",
        action="store_true",
        help="do not require model, probe and SAE paths to exist, nor check the policy against the "
        "model (a policy for another machine)",
    )
    check.set_defaults(func=_policy_check)
    docs = policy.add_parser("docs", help="render the policy reference (markdown) from the schema")
    docs.add_argument(
        "--out", type=Path, default=None, help="write here (e.g. docs/policy.md) instead of stdout"
    )
    docs.set_defaults(func=_policy_docs)

    add_organism(sub)
    add_probe(sub)
    add_sae(sub)
    add_logs(sub)
    add_eval(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except GuardError as exc:
        print(f"guard: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
