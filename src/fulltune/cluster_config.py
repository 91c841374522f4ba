"""What a run configuration needs to run on a cluster, beyond being a valid RunConfig.

A config can be valid and still only work on a laptop: `fulltune demo` trains in its own process
from local paths. On Kubeflow every step is its own pod, so the checks here refuse, before anything
is submitted, what would fail there hours later or silently run somewhere else:

- no model or no data (a scheduled run would start every week with nothing to train);
- `resources.launcher: local` with GPUs or several nodes: `train` would run inside its step pod, in
  the CPU step image, without GPUs;
- `resources.launcher: trainjob` with pod settings a TrainJob cannot carry (`launch.trainjob.unsupported`);
- a location that is a path on this machine: step pods share no filesystem, so every location must
  be an s3:// URI or lie on a volume the training pods mount (`resources.kubernetes.volumes`; the
  step pods mount the same claim through `fulltune compile --work-pvc`).

`fulltune config --check FILE --for-cluster` runs them; `fulltune submit` and `fulltune schedule` run
them on every config they send.
"""

from __future__ import annotations

from fulltune.config import ConfigError, RunConfig
from fulltune.registry.pointers import is_ref
from fulltune.storage import is_s3


def locations(cfg: RunConfig) -> list[tuple[str, str]]:
    """(dotted field, location) of every file or prefix the run reads or writes."""
    out = [
        ("work_dir", cfg.work_dir),
        ("model.base_model_uri", cfg.model.base_model_uri),
        ("model.tokenizer_uri", cfg.model.tokenizer_uri or ""),
        ("data.train_uri", cfg.data.train_uri),
        ("data.eval_uri", cfg.data.eval_uri or ""),
        ("data.general_uri", cfg.data.general_uri or ""),
        ("registry.uri", cfg.registry.uri),
    ]
    ev = cfg.evaluation
    out += [(f"evaluation.mc_tasks[{i}].uri", t.uri) for i, t in enumerate(ev.mc_tasks)]
    out += [(f"evaluation.generation_tasks[{i}].uri", t.uri) for i, t in enumerate(ev.generation_tasks)]
    return [(name, uri) for name, uri in out if uri]


def cluster_problems(cfg: RunConfig) -> list[str]:
    """Every reason `cfg` cannot run on a cluster, each naming the field and what to set instead."""
    problems = cfg.missing_to_run()
    res = cfg.resources
    if res.launcher == "local" and res.accelerator == "gpu":
        problems.append(
            "resources.launcher: local with resources.accelerator: gpu would train inside the train step's "
            "pod, in the CPU step image, without GPUs; set resources.launcher: kubernetes or trainjob "
            "(fulltune doctor says which the cluster serves)"
        )
    if res.launcher == "local" and res.num_nodes > 1:
        problems.append(
            f"resources.num_nodes: {res.num_nodes} needs resources.launcher: kubernetes or trainjob (the "
            "local launcher runs one node)"
        )
    if res.launcher == "trainjob":
        from fulltune.launch.trainjob import unsupported

        problems += unsupported(cfg)
    mounts = [v.mount_path.rstrip("/") + "/" for v in res.kubernetes.volumes]
    for name, uri in locations(cfg):
        if is_ref(uri):
            continue  # a registered version: under registry.uri, checked as such
        if not is_s3(uri) and not any((uri.rstrip("/") + "/").startswith(m) for m in mounts):
            problems.append(
                f"{name}: {uri!r} is a path on this machine, which the step pods cannot see; use an s3:// "
                "URI, or a path on a volume in resources.kubernetes.volumes (mounted into the step pods "
                "with fulltune compile --work-pvc)"
            )
    return problems


def check_for_cluster(cfg: RunConfig, source: str = "") -> None:
    """ConfigError listing every problem of `cluster_problems`, prefixed with `source`."""
    problems = cluster_problems(cfg)
    if problems:
        where = f"{source}: " if source else ""
        raise ConfigError(f"{where}cannot run on a cluster:\n  - " + "\n  - ".join(problems))
