"""The `fulltune` command.

fulltune compile [--image REF] [--root DIR]   regenerate pipelines/ and components/ YAML
fulltune demo [--dir DIR] [--forget]          run the whole pipeline locally (kfp.local) on a tiny model
fulltune config --describe | --check FILE     list every config field / validate a config file
fulltune registry list|show|verify ...        read the model registry
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EXIT_USAGE = 2


def _compile(args: argparse.Namespace) -> int:
    from fulltune.kfp.compile import compile_all

    for path in compile_all(args.root, image=args.image):
        print(path)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fulltune.demo.run import run_demo, summary_text

    result = run_demo(Path(args.dir), forget=args.forget, nproc=args.nproc)
    print(summary_text(result), flush=True)
    return 0


def _config(args: argparse.Namespace) -> int:
    from fulltune.config import ConfigError, RunConfig, describe

    if args.check:
        try:
            cfg = RunConfig.from_yaml(args.check)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(cfg.to_yaml() if args.resolved else f"{args.check}: ok")
        return 0
    print(describe())
    return 0


def _registry(args: argparse.Namespace) -> int:
    from fulltune import storage
    from fulltune.registry.store import list_versions, verify_version

    if args.action == "list":
        for v in list_versions(args.uri, args.name):
            print(f"v{v['version']}\t{v.get('created_at', '')}\t{v['uri']}")
        return 0
    uri = storage.join(args.uri, args.name, f"v{args.version}")
    if args.action == "show":
        print(json.dumps(storage.read_json(storage.join(uri, "manifest.json")), indent=2))
        return 0
    problems = verify_version(uri)
    for p in problems:
        print(f"{uri}: {p}", file=sys.stderr)
    if not problems:
        print(f"{uri}: ok")
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fulltune", description="Full fine-tuning of causal LMs on Kubeflow Pipelines."
    )
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="regenerate the pipeline and component YAML")
    c.add_argument(
        "--image", default=None, help="container image for every step (default: tag = package version)"
    )
    c.add_argument("--root", default=".", help="repository root to write pipelines/ and components/ under")
    c.set_defaults(func=_compile)

    d = sub.add_parser("demo", help="run the whole pipeline locally through kfp.local on a tiny model")
    d.add_argument(
        "--dir", default=".fulltune-demo", help="where the demo keeps its assets, runs and registry"
    )
    d.add_argument(
        "--forget", action="store_true", help="high learning rate, no replay: watch the gate refuse the model"
    )
    d.add_argument("--nproc", type=int, default=2, help="training processes (ZeRO-3 ranks)")
    d.set_defaults(func=_demo)

    g = sub.add_parser("config", help="describe or check a RunConfig")
    g.add_argument(
        "--describe", action="store_true", help="list every field with its default and description"
    )
    g.add_argument("--check", metavar="FILE", help="validate a YAML config file")
    g.add_argument(
        "--resolved", action="store_true", help="with --check: print the config with defaults filled in"
    )
    g.set_defaults(func=_config)

    r = sub.add_parser("registry", help="read the model registry")
    r.add_argument("action", choices=["list", "show", "verify"])
    r.add_argument("--uri", required=True, help="registry root (local directory or s3://)")
    r.add_argument("--name", required=True, help="model name")
    r.add_argument("--version", type=int, help="version number (show, verify)")
    r.set_defaults(func=_registry)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    if getattr(args, "action", None) in ("show", "verify") and args.version is None:
        print("error: --version is required for show and verify", file=sys.stderr)
        return EXIT_USAGE
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
