"""The `fulltune` command.

fulltune compile [--image REF] [--root DIR]   regenerate pipelines/ and components/ YAML
                 [--s3-secret NAME] [--mlflow-secret NAME] [--eval-gpus N]
fulltune submit [--params FILE] [--param N=V]  run the pipeline on a Kubeflow Pipelines cluster
fulltune schedule --cron EXPR --name NAME ... create or update a recurring run
fulltune upload [--defaults FILE]             put the pipeline on KFP for runs started from its UI
fulltune demo [--dir DIR] [--forget]          run the whole pipeline locally (kfp.local) on a tiny model
fulltune check CONFIG / run CONFIG [--until]  the dry run / the pipeline here on your own model and data
fulltune config --describe | --check FILE     list every config field / validate a config file
fulltune registry list|show|verify|history|promote|rollback|register ...  the model registry
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fulltune import _logging, _process
from fulltune.kfp.cluster import MLFLOW_SECRET_KEYS, REGISTRY_SECRET, S3_SECRET, secret_name_argument

if TYPE_CHECKING:
    from fulltune.config import RunConfig

EXIT_USAGE = 2
RUN_DIR = ".fulltune-run"  # `run`, `check` and `runs` without --dir
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C
# Every sub-command's --help ends with these (argparse exits 2 on bad arguments by itself).
EXIT_CODES = """exit codes:
  0  done: every check passed, the run succeeded, the command did what it says
  1  refused or failed: the message names the problem and where it is (the data, the model, a
     config that does not validate or cannot run on the cluster, a failed run, an API or storage
     error); nothing half-written is left
  2  usage: bad arguments; for submit, schedule, upload and doctor also a config or parameters
     file that does not validate (nothing was created)
  3  submit --wait: gave up at --timeout while the run was still going
130  interrupted (Ctrl-C; for run and demo also SIGTERM): the processes a local run started are
     stopped, and `run` says how to go on from the run's newest checkpoint"""


def _command(commands, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    """A sub-command whose own --help says what it does (`description`, else its one-line help) and
    ends with the exit codes."""
    import textwrap

    text = description or help[:1].upper() + help[1:] + "."
    return commands.add_parser(
        name,
        help=help,
        description=textwrap.fill(text, 88),
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _compile(args: argparse.Namespace) -> int:
    from fulltune.config import read_config_file
    from fulltune.kfp.cluster import step_resources
    from fulltune.kfp.compile import compile_all
    from fulltune.kfp.pipeline import parse_pvc

    try:  # ConfigError is a ValueError: the file's own problems end the same way
        overrides = read_config_file(args.step_resources) if args.step_resources else None
        resources = step_resources(overrides, args.step_resources or "")
        if args.work_pvc:  # checked before anything is written, as submit and upload do
            parse_pvc(args.work_pvc)
    except ValueError as exc:
        print(f"fulltune compile: {exc}", file=sys.stderr)
        return 2
    for path in compile_all(
        args.root,
        image=args.image,
        trainer_image=args.trainer_image,
        s3_secret=args.s3_secret,
        eval_gpus=args.eval_gpus,
        work_pvc=args.work_pvc,
        step_resources=resources,
        registry_secret=args.registry_secret,
        mlflow_secret=args.mlflow_secret,
    ):
        print(path)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fulltune.config import ConfigError
    from fulltune.demo.run import run_demo
    from fulltune.kfp.local_run import StepFailed

    if problem := _dir_problem(Path(args.dir)):
        print(f"error: {problem}", file=sys.stderr)
        return 1
    try:
        outcome = run_demo(Path(args.dir), forget=args.forget, nproc=args.nproc)
    except ConfigError as exc:  # a run of the demo's directory running now
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except StepFailed:  # the step, its error message and the log were printed
        return 1
    print(outcome.summary("fulltune demo"), flush=True)
    return 0


def _at_least(low: int):
    """An argument type for a count: a whole number, `low` or more (argparse's usage error, exit 2,
    rather than a traceback from the code the count reaches)."""

    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r}: a whole number, {low} or more")
        return value

    return count


_positive = _at_least(1)  # processes


def _run(args: argparse.Namespace) -> int:
    from fulltune.config import ConfigError, RunConfig
    from fulltune.user_run import RunStopped, dry_run, full_run

    if problem := _dir_problem(Path(args.dir)):
        print(f"error: {problem}", file=sys.stderr)
        return 1
    try:
        cfg = RunConfig.from_yaml(args.config)
        if args.until:
            return dry_run(cfg, Path(args.dir), args.until, sys.stdout)
        outcome = full_run(cfg, Path(args.dir), resume=args.resume)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except RunStopped as stopped:  # a failed step, its message and the log were printed
        if stopped.interrupted:
            print("interrupted: the run's steps were stopped", flush=True)
        if run := stopped.resumable:
            print(f"run {run.run_id} can go on from {run.where}: {_resume_command(args, run.run_id)}")
        return EXIT_INTERRUPTED if stopped.interrupted else 1
    print(outcome.summary("fulltune run"), flush=True)
    return 0


def _dir_problem(path: Path) -> str | None:
    """Why --dir cannot hold a local run's files (it, or a folder above it, is a file), or None:
    found here rather than as a traceback from the first step that writes there."""
    for place in (path, *path.parents):
        if place.is_dir():
            return None
        if place.exists():
            what = "is a file" if place == path else f"is under {place}, a file"
            return f"--dir {path}: {what}, not a directory (name a directory for the run's files)"
    return None


def _resume_command(args: argparse.Namespace, run_id: str) -> str:
    """`fulltune run` of the same config and --dir with --resume of `run_id`: how a stopped local run
    goes on. The id is named although it is often the only unfinished run: with another one beside
    it (an earlier stopped run in the same work_dir), a bare --resume is refused as ambiguous."""
    return shlex.join(["fulltune", "run", args.config, "--dir", args.dir, "--resume", run_id])


def _listed_resume_command(args: argparse.Namespace, own: RunConfig) -> str:
    """How a run `fulltune runs` lists goes on (its id is added): the config as named (CONFIG when
    none was), and --dir only where it matters, as given (it filled the config's work_dir or
    registry.uri, or was named): with both set in the config, a resumed run finds and registers
    the same whatever its --dir."""
    command = ["fulltune", "run", args.config or "CONFIG"]
    if own.missing("work_dir", "registry.uri") or args.dir != RUN_DIR:
        command += ["--dir", args.dir]
    return shlex.join([*command, "--resume"])


def _listed_dir_problem(work_dir: str) -> str | None:
    """Why a local --work-dir named to be listed cannot hold runs: named on its own, a missing one is
    a typo, not a work_dir whose runs have not started (that a config's may be)."""
    if not work_dir or work_dir.startswith("s3://") or os.path.isdir(work_dir):
        return None
    return "is not a directory" if os.path.exists(work_dir) else "does not exist"


def _runs(args: argparse.Namespace) -> int:
    from fulltune.config import ConfigError, RunConfig
    from fulltune.run_list import describe_runs, run_statuses
    from fulltune.user_run import with_local_locations

    as_json = args.output == "json"
    if args.config and args.work_dir:  # one would be ignored: the listing would not be of what was asked
        print(f"error: --work-dir {args.work_dir}: give CONFIG or --work-dir, not both", file=sys.stderr)
        return EXIT_USAGE
    if problem := _dir_problem(Path(args.dir)):
        print(f"error: {problem}", file=sys.stderr)
        return 1
    try:
        say = (lambda line: print(line, file=sys.stderr)) if as_json else print
        if args.config:
            own = RunConfig.from_yaml(args.config)
            cfg = with_local_locations(own, Path(args.dir), say=say)
        else:  # the runs `fulltune run --dir` keeps, or those under --work-dir: the header says which
            own = RunConfig.from_dict({"work_dir": args.work_dir or ""})
            if problem := _listed_dir_problem(own.work_dir):
                print(f"error: --work-dir {own.work_dir}: {problem}", file=sys.stderr)
                return 1
            cfg = with_local_locations(own, Path(args.dir), say=lambda _: None)
        if as_json:
            print(json.dumps([s.to_json() for s in run_statuses(cfg.work_dir)], indent=2))
        else:
            print(describe_runs(cfg, _listed_resume_command(args, own)))
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _config(args: argparse.Namespace) -> int:
    from fulltune.config import ConfigError, RunConfig, describe

    if (args.resolved or args.for_cluster) and not args.check:
        # Without a file they would print the field list and exit 0, read as a check that passed.
        given = "--resolved" if args.resolved else "--for-cluster"
        print(f"error: {given} goes with --check FILE (the config to check)", file=sys.stderr)
        return EXIT_USAGE
    if args.check:
        try:
            cfg = RunConfig.from_yaml(args.check)
            if args.for_cluster:
                from fulltune.cluster_config import check_for_cluster

                check_for_cluster(cfg, args.check)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        where = " (ready for a cluster)" if args.for_cluster else ""
        print(cfg.to_yaml() if args.resolved else f"{args.check}: ok{where}")
        return 0
    print(describe())
    return 0


def _registry(args: argparse.Namespace) -> int:
    from fulltune import storage
    from fulltune.registry.layout import RegistryError

    if args.action == "register":
        return _registry_register(args)
    try:
        if args.action in ("promote", "rollback"):
            return _registry_move(args)
        return _registry_read(args)
    except (storage.StorageError, RegistryError) as exc:  # a missing bucket, refused keys, no endpoint
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _registry_read(args: argparse.Namespace) -> int:
    """registry list, show and verify."""
    from fulltune import storage
    from fulltune.registry import pointers
    from fulltune.registry.layout import MANIFEST, RegistryError, version_uri
    from fulltune.registry.store import list_versions, verify_version

    if args.action == "list":
        versions = list_versions(args.uri, args.name)
        if not versions:
            print(f"error: no committed version of {args.name!r} under {args.uri}", file=sys.stderr)
            return 1
        named = pointers.pointers_by_version(args.uri, args.name)
        for v in versions:
            marks = ",".join(named.get(v["version"], [])) or "-"
            print(f"v{v['version']}\t{marks}\t{v.get('created_at', '')}\t{v['uri']}")
        return 0
    if args.action == "history":
        records = pointers.history(args.uri, args.name, args.pointer)
        if not records:  # as `list` does: a misspelt name or registry is not an empty history
            print(f"error: {args.name}: {args.pointer} was never set under {args.uri}", file=sys.stderr)
            return 1
        for r in records:
            was = f"v{r.previous}" if r.previous is not None else "unset"
            print(f"{r.at}\t{r.action}\t{was} -> v{r.version}\t{r.by}\t{r.reason}")
        return 0
    uri = version_uri(args.uri, args.name, args.version)
    if args.action == "show":
        try:
            manifest = storage.read_json(storage.join(uri, MANIFEST))
        except FileNotFoundError:
            print(f"error: {uri}: no committed version (no {MANIFEST})", file=sys.stderr)
            return 1
        except (storage.StorageError, ValueError, RegistryError) as exc:
            print(f"error: {uri}: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(manifest, indent=2))
        return 0
    problems = verify_version(uri)
    for p in problems:
        print(f"{uri}: {p}", file=sys.stderr)
    if not problems:
        print(f"{uri}: ok")
    return 1 if problems else 0


def _registry_move(args: argparse.Namespace) -> int:
    """registry promote and rollback: move `production`, recorded with who, when and why."""
    from fulltune.config import ConfigError, RunConfig

    section = None
    if args.config:  # read before moving: a config that cannot mirror the move must not leave it half-done
        try:
            section = RunConfig.from_yaml(args.config).registry.kubeflow
        except ConfigError as exc:
            print(f"error: {exc}; production not moved", file=sys.stderr)
            return 1
        if section is None:
            print(
                f"error: {args.config}: no registry.kubeflow to mirror the move in; production not moved",
                file=sys.stderr,
            )
            return 1
    record = _move_production(args)
    if section is not None:  # mirror the move in the Kubeflow Model Registry its registry.kubeflow names
        from fulltune.registry.kubeflow import record_pointers

        record_pointers(section, args.name, {record.pointer: record})
        print(f"{args.name}: recorded in the Kubeflow Model Registry ({section.server_address})")
    return 0


def _move_production(args: argparse.Namespace):
    """Promote or roll back as asked; returns the record production stands at afterwards. Promoting
    the version production names already moves nothing: a record `v5 -> v5` would make it its own
    previous version, and `rollback` would then have nowhere to go back to."""
    from fulltune.registry import pointers

    if args.action == "rollback":
        record = pointers.rollback(args.uri, args.name, reason=args.reason, version=args.version)
    elif (now := pointers.current(args.uri, args.name, pointers.PRODUCTION)) and now.version == args.version:
        print(
            f"{args.name}: production already names v{now.version} ({now.action} by {now.by} at "
            f"{now.at}: {now.reason}); nothing moved"
        )
        return now
    else:
        expected = now.version if now else None
        record = pointers.promote(args.uri, args.name, args.version, reason=args.reason, expected=expected)
    was = f"v{record.previous}" if record.previous is not None else "unset"
    print(
        f"{args.name}: production {was} -> v{record.version} ({record.action} by {record.by}: {record.reason})"
    )
    return record


def _registry_register(args: argparse.Namespace) -> int:
    """Register a model the way the pipeline's `register` step does (Kubeflow Model Registry too)."""
    from fulltune import steps, storage
    from fulltune.config import ConfigError, RunConfig
    from fulltune.evaluate.result import EvalResultError
    from fulltune.registry.layout import RegistryError

    try:
        cfg = RunConfig.from_yaml(args.config)
        uri = steps.register(cfg, args.model, args.eval, run_id=args.run_id, force=args.force)
    except FileNotFoundError as exc:
        print(f"error: {exc.filename or exc}: not found", file=sys.stderr)
        return 1
    # StorageError: a missing bucket, refused keys, no endpoint, as for the other registry commands
    except (ConfigError, EvalResultError, RegistryError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(uri)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fulltune",
        description="Full fine-tuning of causal LMs on Kubeflow Pipelines.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_compile(commands)
    _add_demo(commands)
    _add_run(commands)
    _add_config(commands)
    _add_submit_and_schedule(commands)
    _add_registry(commands)
    return parser


def _add_compile(commands) -> None:
    compile_cmd = _command(commands, "compile", "regenerate the pipeline and component YAML")
    compile_cmd.add_argument(
        "--image", default=None, help="container image of the CPU steps (default: tag = package version)"
    )
    compile_cmd.add_argument(
        "--trainer-image",
        default=None,
        help="image of the training pods and the GPU evaluate step (default: the -trainer image, same tag)",
    )
    compile_cmd.add_argument(
        "--root", default=".", help="repository root to write pipelines/ and components/ under"
    )
    compile_cmd.add_argument(
        "--s3-secret",
        type=secret_name_argument,
        default=S3_SECRET,
        metavar="NAME",
        help="Kubernetes Secret whose AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, "
        "AWS_ENDPOINT_URL and AWS_DEFAULT_REGION keys (each optional) become the step pods' environment "
        f"(default: {S3_SECRET}; '' for none)",
    )
    compile_cmd.add_argument(
        "--registry-secret",
        type=secret_name_argument,
        default=REGISTRY_SECRET,
        metavar="NAME",
        help=f"Kubernetes Secret whose MODEL_REGISTRY_TOKEN key reaches the register step, optionally "
        f"(default: {REGISTRY_SECRET}; '' for none)",
    )
    compile_cmd.add_argument(
        "--mlflow-secret",
        type=secret_name_argument,
        default="",
        metavar="NAME",
        help=f"Kubernetes Secret whose {', '.join(MLFLOW_SECRET_KEYS)} keys (each optional) reach the "
        "train, evaluate and register steps and the training pods, for training.report_to: mlflow "
        "(default: none)",
    )
    compile_cmd.add_argument(
        "--eval-gpus",
        type=_at_least(0),
        default=1,
        metavar="N",
        help="GPUs for the evaluate step (default: 1; 0: CPU)",
    )
    compile_cmd.add_argument(
        "--work-pvc",
        default=None,
        metavar="CLAIM:/PATH",
        help="mount this RWX PersistentVolumeClaim into every step pod (a work_dir on a volume instead of S3)",
    )
    compile_cmd.add_argument(
        "--step-resources",
        default=None,
        metavar="FILE",
        help="YAML mapping step -> {cpu, memory, cpu_limit, memory_limit} overriding the step pods' "
        "requests and limits (defaults: fulltune.kfp.cluster.STEP_RESOURCES)",
    )
    compile_cmd.set_defaults(func=_compile)


def _add_demo(commands) -> None:
    demo = _command(commands, "demo", "run the whole pipeline locally through kfp.local on a tiny model")
    demo.add_argument(
        "--dir", default=".fulltune-demo", help="where the demo keeps its assets, runs and registry"
    )
    demo.add_argument(
        "--forget", action="store_true", help="high learning rate, no replay: watch the gate refuse the model"
    )
    demo.add_argument("--nproc", type=_positive, default=2, help="training processes (ZeRO-3 ranks)")
    demo.set_defaults(func=_demo)


def _add_run(commands) -> None:
    from fulltune.user_run import CHECKING_STEPS

    run = _command(
        commands,
        "run",
        "run the pipeline here on your own model and data (kfp.local); --until plan is the dry run",
        "Run the compiled pipeline on this machine through kfp.local with the local launcher, on the model "
        "and data CONFIG names (local paths or s3://). --until STEP stops after a checking step: --until "
        "plan validates the data, checks the model and tokenizer and plans, without training. --resume "
        "runs a stopped run (a crash, a reboot, Ctrl-C, a failed step) again, from its newest complete "
        "checkpoint (saved every training.save_every_minutes or save_steps), or after its training when "
        "that had finished.",
    )
    check = _command(
        commands,
        "check",
        "the dry run: validate the data, check the model and tokenizer, plan (= run --until plan)",
        "Validate the data, check the base model's files and the tokenizer, and plan the run, printing one "
        "line per step and a verdict; nothing is trained.",
    )
    for parser in (run, check):
        parser.add_argument("config", help="the RunConfig (YAML or JSON)")
        parser.add_argument("--dir", default=RUN_DIR, help="where the reports and the local run go")
        parser.set_defaults(func=_run)
    how = run.add_mutually_exclusive_group()
    how.add_argument("--until", choices=CHECKING_STEPS, help="stop after this step (plan: the dry run)")
    how.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="RUN_ID",
        help="run the unfinished run under work_dir again (or RUN_ID, when there are several), from its "
        "newest complete checkpoint or its finished training; a config that changes what it trained with "
        "is refused",
    )
    check.set_defaults(until="plan", resume=None)
    runs = _command(
        commands,
        "runs",
        "list the runs under a config's work_dir: running, evaluated (gain, forgetting, version), resumable",
        "One line a run under CONFIG's work_dir, or --work-dir (neither: under --dir, as `fulltune run` puts it): running now "
        "(and which process), evaluated (the domain loss change, forgetting, verdict and registered "
        "version), stopped where `fulltune run --resume` goes on, or stopped before any checkpoint; and the "
        "disk its checkpoints take.",
    )
    runs.add_argument(
        "config", nargs="?", help="the RunConfig (YAML or JSON) whose work_dir holds the runs (default: none)"
    )
    runs.add_argument("--dir", default=RUN_DIR, help="where `fulltune run` put an unset work_dir")
    runs.add_argument(
        "--work-dir",
        default=None,
        metavar="URI",
        help="without a CONFIG: the work_dir to list (local or s3://)",
    )
    runs.add_argument("--output", choices=("text", "json"), default="text", help="json: one object a run")
    runs.set_defaults(func=_runs)


def _add_config(commands) -> None:
    config = _command(commands, "config", "describe or check a RunConfig")
    config.add_argument(
        "--describe", action="store_true", help="list every field with its default and description"
    )
    config.add_argument("--check", metavar="FILE", help="validate a YAML config file")
    config.add_argument(
        "--resolved", action="store_true", help="with --check: print the config with defaults filled in"
    )
    config.add_argument(
        "--for-cluster",
        action="store_true",
        help="with --check: also refuse what only runs on one machine (no model or data, the local launcher "
        "with GPUs, paths the step pods cannot see); submit and schedule always check this",
    )
    config.set_defaults(func=_config)


def _add_submit_and_schedule(commands) -> None:
    from fulltune.kfp.submit import (
        add_arguments,
        add_retry_arguments,
        add_unschedule_arguments,
        add_upload_arguments,
        cli_retry,
        cli_schedule,
        cli_submit,
        cli_unschedule,
        cli_upload,
    )

    submit = _command(
        commands, "submit", "upload the pipeline (a new version only when it changed) and start a run on KFP"
    )
    schedule = _command(commands, "schedule", "create or update a recurring run on KFP, one per name")
    add_arguments(submit, schedule)
    submit.set_defaults(func=cli_submit)
    schedule.set_defaults(func=cli_schedule)
    retry = _command(
        commands,
        "retry",
        "run a failed or canceled run again as the same run; training resumes from its newest checkpoint",
        "Retry a failed or canceled run on KFP (the UI's Retry): its failed steps run again under the same "
        "run id, over the same work directory, so the train step resumes from the run's newest complete "
        "checkpoint (a config that changed what it trained with is refused there). --wait ends as submit "
        "--wait does.",
    )
    add_retry_arguments(retry)
    retry.set_defaults(func=cli_retry)
    upload = _command(
        commands,
        "upload",
        "put the pipeline on KFP as a version, its form pre-filled with --defaults; start nothing",
    )
    add_upload_arguments(upload)
    upload.set_defaults(func=cli_upload)
    unschedule = _command(commands, "unschedule", "delete recurring runs by name or by owner")
    add_unschedule_arguments(unschedule)
    unschedule.set_defaults(func=cli_unschedule)
    doctor = _command(
        commands, "doctor", "check that this cluster and namespace can run a config (helm test runs it)"
    )
    _add_doctor(doctor)


def _add_doctor(doctor) -> None:
    from fulltune.doctor import add_arguments, cli_doctor

    add_arguments(doctor)
    doctor.set_defaults(func=cli_doctor)


def _add_registry(commands) -> None:
    registry = _command(commands, "registry", "read the model registry, or register a model")
    actions = registry.add_subparsers(dest="action", required=True)
    for action, help_text in (
        ("list", "list the committed versions of a model and the pointers (production, latest) naming them"),
        ("show", "print a version's manifest"),
        ("verify", "rehash a version's files against its manifest"),
        ("history", "every move of a pointer: when, what, from which version, by whom and why"),
        ("promote", "point production at a committed version (refused if it moved meanwhile)"),
        ("rollback", "point production back at the version before (or --version), saying why"),
    ):
        reader = _command(actions, action, help_text)
        reader.add_argument("--uri", required=True, help="registry root (local directory or s3://)")
        reader.add_argument("--name", required=True, help="model name")
        if action in ("show", "verify", "promote"):
            reader.add_argument("--version", type=int, required=True, help="version number")
        if action == "rollback":
            reader.add_argument("--version", type=int, default=None, help="default: the version before")
        if action in ("promote", "rollback"):
            reader.add_argument("--reason", required=True, help="why: recorded with who and when")
            reader.add_argument(
                "--config",
                default=None,
                help="RunConfig YAML whose registry.kubeflow also gets the move (token: $MODEL_REGISTRY_TOKEN)",
            )
        if action == "history":
            reader.add_argument("--pointer", default="production", choices=("production", "latest"))
    register = _command(
        actions,
        "register",
        "register a model as the pipeline's register step does (S3/local, then the Kubeflow "
        "Model Registry when registry.kubeflow is set; its token from $MODEL_REGISTRY_TOKEN)",
    )
    register.add_argument(
        "--config", required=True, help="RunConfig YAML: registry.uri, model.name, registry.kubeflow"
    )
    register.add_argument("--model", required=True, help="the tuned model: local directory or s3:// prefix")
    register.add_argument(
        "--eval", required=True, help="eval.json written by the evaluate step (local or s3://)"
    )
    register.add_argument(
        "--run-id", default="", help="the pipeline run: a repeat with the same id reuses its version"
    )
    register.add_argument(
        "--force",
        action="store_true",
        help="register although the evaluation gate failed (recorded as forced in lineage.json)",
    )
    registry.set_defaults(func=_registry)


def main(argv: list[str] | None = None) -> int:
    _logging.setup("stderr")
    _process.exit_without_final_collection()
    args = build_parser().parse_args(argv)
    if getattr(args, "action", None) in ("show", "verify") and args.version is None:
        print("error: --version is required for show and verify", file=sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `fulltune registry show ... | head`: the reader has what it wanted
        # Python flushes stdout again at exit and would report the closed pipe there: point it at devnull
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
