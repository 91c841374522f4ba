"""Optional lm-evaluation-harness tasks, reported beside fulltune's own numbers (not gated).

When `evaluation.lm_eval_tasks` lists task names (e.g. `["hellaswag", "arc_easy"]`), the
`evaluate` step runs

    lm_eval.simple_evaluate(model="hf", model_args={"pretrained": <local model dir>, "dtype": ...,
                            "trust_remote_code": ..., "parallelize": <device_map is auto>},
                            tasks=lm_eval_tasks, batch_size=per_device_eval_batch_size,
                            limit=max_eval_sequences, device=<cuda or cpu>)

for the base and then the tuned model (the harness loads each model itself, so this is a second
pass over those models, after fulltune's own one-pass scoring; s3:// models are downloaded for it).
Every numeric metric of each configured task (`acc,none` becomes `acc`; `exact_match,strict-match`
becomes `exact_match_strict-match`; standard errors are left out) lands in `eval.json` under
`lm_eval`, in the KFP Metrics as `lm_eval_<task>_<metric>_{base,tuned,change}` and in the report's
table. These rows are **reported only**: the gate does not read them, because their thresholds
would depend on the harness version and task configuration; gate on the multiple-choice and
generation tasks of `mc.py` / `generation.py` instead.

lm-eval is not a dependency of fulltune (it pulls in many packages). A run that lists
`lm_eval_tasks` in an image without it **fails before any model is loaded**, with an error that says
`pip install lm-eval`: a configured evaluation that silently did not happen would be worse than a
failed step. With `lm_eval_tasks` empty (the default) nothing here is imported.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fulltune import storage

if TYPE_CHECKING:
    import torch

    from fulltune.config import RunConfig

log = logging.getLogger(__name__)


class LMEvalMissingError(RuntimeError):
    """`evaluation.lm_eval_tasks` is set but the lm-eval package is not installed."""


def available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def require(tasks: Sequence[str]) -> None:
    """Fail fast when tasks are configured and lm-eval cannot be imported."""
    if tasks and not available():
        raise LMEvalMissingError(
            f"evaluation.lm_eval_tasks is set ({list(tasks)}) but lm-eval is not installed in this "
            "environment: pip install 'fulltune[lm-eval]' or lm-eval (in the image that runs the evaluate step), or clear "
            "evaluation.lm_eval_tasks"
        )


def run(
    cfg: RunConfig,
    uris: Mapping[str, str],
    *,
    device: torch.device,
    dtype: torch.dtype,
    device_map: str | None,
) -> dict[str, dict[str, Any]]:
    """`simple_evaluate` per model: {role: the harness's `results` dict}; {} when no task is configured."""
    ev = cfg.evaluation
    if not ev.lm_eval_tasks:
        return {}
    require(ev.lm_eval_tasks)
    import lm_eval

    out: dict[str, dict[str, Any]] = {}
    for role, uri in uris.items():
        with storage.local_dir(uri) as path:
            model_args: dict[str, Any] = {
                "pretrained": str(path),
                "dtype": str(dtype).removeprefix("torch."),
                "trust_remote_code": cfg.model.trust_remote_code,
            }
            if device_map == "auto":
                model_args["parallelize"] = True
            log.info("lm-eval: %s model on %s", role, ", ".join(ev.lm_eval_tasks))
            results = lm_eval.simple_evaluate(
                model="hf",
                model_args=model_args,
                tasks=list(ev.lm_eval_tasks),
                batch_size=ev.per_device_eval_batch_size,
                limit=ev.max_eval_sequences,
                device=None if device_map == "auto" else str(device),
                log_samples=False,
            )
        out[role] = (results or {}).get("results", {})
    return out


def metric_name(key: str) -> str:
    """'acc,none' -> 'acc'; 'exact_match,strict-match' -> 'exact_match_strict-match'."""
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric}_{filt}"


def merge(by_role: Mapping[str, Mapping[str, Any]], tasks: Sequence[str] | None = None) -> dict[str, Any]:
    """{task: {metric: {"base", "tuned", "change"}}} from the harness's per-model `results`.

    Only numeric, finite metrics present for both models; standard errors and aliases are dropped.
    With `tasks`, only those tasks (and every task when none of them is in the results, e.g. a
    group reported under its subtasks).
    """
    if not by_role:
        return {}
    base, tuned = by_role.get("base", {}), by_role.get("tuned", {})
    names = [t for t in base if t in tuned]
    if tasks:
        wanted = [t for t in names if t in tasks]
        names = wanted or names
    merged: dict[str, Any] = {}
    for task in names:
        rows = {}
        for key, b in base[task].items():
            t = tuned[task].get(key)
            if "_stderr" in key or not _number(b) or not _number(t):
                continue
            rows[metric_name(key)] = {"base": float(b), "tuned": float(t), "change": float(t) - float(b)}
        if rows:
            merged[task] = rows
    return merged


def flat_metrics(merged: Mapping[str, Any]) -> dict[str, float]:
    """KFP Metrics names: lm_eval_<task>_<metric>_{base,tuned,change}, [A-Za-z0-9_] only."""
    out = {}
    for task, rows in merged.items():
        for metric, values in rows.items():
            stem = re.sub(r"[^A-Za-z0-9_]", "_", f"lm_eval_{task}_{metric}")
            for what in ("base", "tuned", "change"):
                out[f"{stem}_{what}"] = values[what]
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
