"""What a pipeline run came to, for whoever started it: the domain gain, the forgetting, the gate's
verdict and reasons, the version registered and the one production names after the run.

`fulltune run` and `fulltune demo` read it from kfp.local's outputs of the run's steps
(`fulltune.kfp.local_run`); `fulltune submit --wait` from where the steps wrote on the cluster:
evaluate's eval.json under the run's own work directory, and the registry's version whose manifest
names the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fulltune import storage
from fulltune.config import RunConfig

if TYPE_CHECKING:
    from fulltune.evaluate.result import EvalResult


JSON_KEYS = ("verdict", "registered", "production")  # RunOutcome.to_json's; null when not read


def outcome_json(outcome: RunOutcome | None) -> dict[str, Any]:
    """`outcome.to_json()`, or the same keys, null, for an outcome that could not be read."""
    return outcome.to_json() if outcome else dict.fromkeys(JSON_KEYS)


@dataclass(frozen=True)
class RunOutcome:
    work_dir: str  # the run's own directory, as plan scoped work_dir to it
    tensorboard: str | None  # where training wrote TensorBoard's event files (report_to tensorboard)
    eval_result: EvalResult | None  # evaluate's eval.json; None if evaluate did not run
    registered: str | None  # the registered version's URI; None when the gate refused the model
    production: int | None = None  # the version production names after the run, if any
    promote_command: str | None = None  # how to make the registered version production, when it is not

    @classmethod
    def of(cls, cfg: RunConfig, eval_result: EvalResult | None, registered: str | None) -> RunOutcome:
        """`cfg`: the run's resolved config, its work_dir the run's own."""
        return cls(cfg.work_dir, cfg.tensorboard_dir, eval_result, registered, **_production(cfg, registered))

    @classmethod
    def from_storage(cls, cfg: RunConfig, run_id: str) -> RunOutcome:
        """Pipeline run `run_id` of `cfg` (as submitted: work_dir not yet scoped), read where its steps
        wrote. StorageError or RegistryError when the work directory or registry cannot be read."""
        from fulltune.evaluate.result import EvalResult
        from fulltune.layout import RunLayout
        from fulltune.registry.store import version_of_run

        scoped = cfg.with_overrides({"work_dir": RunLayout.for_run(cfg.work_dir, run_id).root})
        eval_uri = scoped.layout.eval_result
        evaluated = EvalResult.load(eval_uri) if storage.exists(eval_uri) else None
        version = version_of_run(cfg.registry.uri, cfg.model.name, run_id) if cfg.registry.uri else None
        return cls.of(scoped, evaluated, version["uri"] if version else None)

    @property
    def verdict(self) -> str | None:
        """pass or fail; None when evaluate did not run."""
        return None if self.eval_result is None else "pass" if self.eval_result.verdict else "fail"

    def to_json(self) -> dict[str, Any]:
        """For `--output json`: what a CI job decides on (production: the served version's number)."""
        return dict(zip(JSON_KEYS, (self.verdict, self.registered, self.production), strict=True))

    def summary(self, title: str) -> str:
        """The closing lines: the gain, the forgetting, the verdict with its reasons, and where the
        registered model is."""
        from fulltune.evaluate.result import DOMAIN, GENERAL

        lines = ["", f"== {title} ==", f"work directory:     {self.work_dir}"]
        if self.tensorboard:
            lines.append(f"tensorboard:        tensorboard --logdir {self.tensorboard}")
        evaluated = self.eval_result
        if evaluated is None:
            return "\n".join([*lines, "verdict:            none (evaluate did not run)"])
        domain = evaluated.sets[DOMAIN]
        lines.append(
            f"domain eval loss:   {domain.base.loss:.4f} -> {domain.tuned.loss:.4f} "
            f"({100 * evaluated.domain_loss_improvement:.1f}% lower)"
        )
        if (general := evaluated.sets.get(GENERAL)) and evaluated.forgetting is not None:
            lines.append(
                f"general perplexity: {general.base.perplexity:.2f} -> {general.tuned.perplexity:.2f} "
                f"(forgetting {100 * evaluated.forgetting:+.1f}%)"
            )
        lines.append("verdict:            " + ("PASS" if evaluated.verdict else "FAIL"))
        lines += [f"  - {r}" for r in evaluated.reasons]
        lines.append(
            f"registered model:   {self.registered}"
            if self.registered
            else "registered model:   none — the gate refused this model (the pipeline run itself succeeded)"
        )
        if self.production is not None:
            mine = " (this run's)" if self.registered and self.promote_command is None else ""
            lines.append(f"production:         v{self.production}{mine}")
        if self.promote_command:
            lines.append(f"  to serve this version instead: {self.promote_command}")
        return "\n".join(lines)


def _production(cfg: RunConfig, registered: str | None) -> dict[str, Any]:
    """Which version production names after the run, and the command that would promote the one
    this run registered when production names another (a later version passes the gate without
    replacing the served one unless evaluation.compare_to: registered beat it)."""
    from fulltune.registry import pointers

    if not cfg.registry.uri:
        return {}
    now = pointers.current(cfg.registry.uri, cfg.model.name, pointers.PRODUCTION)
    if now is None:
        return {}
    mine = storage.basename(registered.rstrip("/")) if registered else None
    if mine is None or mine == f"v{now.version}":
        return {"production": now.version}
    command = (
        f"fulltune registry promote --uri {cfg.registry.uri} --name {cfg.model.name} "
        f'--version {mine.removeprefix("v")} --reason "..."'
    )
    return {"production": now.version, "promote_command": command}
