"""`python -m fulltune.launch.node [torchrun options] -m fulltune.train ...`: torchrun for one node
that passes on *why* its ranks failed.

torchrun exits 1 whatever its workers' exit codes were, but the PyTorchJob's `restartPolicy:
ExitCode` reads the pod's code to decide whether to restart: 1-127 permanent, 128+ retryable. This
wrapper runs torchrun's own `run()` and turns the root-cause failure (the first rank that failed)
into the pod's exit code:

    rank exited 1 or 2 (bad config/data, unexpected error)  -> the same code: not retried
    rank killed by a signal (OOM killer, eviction) or 128+  -> 138: the group restarts and resumes
    rendezvous failure (a peer never came up)                -> 138
    any other code 3-127                                      -> that code
"""

from __future__ import annotations

import sys
import tempfile

from fulltune.train.exit_codes import EXIT_RETRYABLE, is_retryable


def node_exit_code(worker_exit_code: int) -> int:
    """The node's exit code for the exit code of the rank that failed first."""
    if is_retryable(worker_exit_code):
        return EXIT_RETRYABLE
    return worker_exit_code or 1


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.run import parse_args

    from fulltune.launch.secret_env import export_secret_env

    export_secret_env()  # before torchrun starts the ranks, which inherit the variables
    args = parse_args(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="fulltune-torchrun-") as logs:
        # torchrun's own default (a mkdtemp per launch, never removed) leaves a directory per run
        # in the machine's temp dir; the ranks' error files are read before this one goes
        args.log_dir = args.log_dir or logs
        return _run_node(args)


def _run_node(args) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import run

    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = node_exit_code(failure.exitcode)
        print(
            f"fulltune.launch.node: rank {rank} failed first with exit code {failure.exitcode}; "
            f"node exits {code} ({'retryable' if is_retryable(code) else 'permanent'})\n{exc.format_msg()}",
            file=sys.stderr,
            flush=True,
        )
        return code
    except RendezvousError as exc:
        print(
            f"fulltune.launch.node: rendezvous failed ({exc}); node exits {EXIT_RETRYABLE}", file=sys.stderr
        )
        return EXIT_RETRYABLE
    return 0


if __name__ == "__main__":
    from fulltune._process import exit_without_final_collection, stop_with_run_owner

    exit_without_final_collection()
    stop_with_run_owner()
    sys.exit(main())
