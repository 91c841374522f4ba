"""The layout of a run's work directory: every URI a step reads or writes there, named once.

    <work_dir>/<run id>/
        checks/     validate_data.html, check_tokenizer.html (the checking steps' reports)
        plan/       plan.json, plan.md, config.yaml (the resolved RunConfig), ds_config.json
        data/       shards/shard-NNNNN.json and shards/<split>-NNNNN.parquet, dataset.json
        train/      model/ (the tuned model), checkpoints/, metrics.jsonl
        eval/       eval.json, report.html

The pipeline scopes `work_dir` to the run (`RunLayout.for_run`); `plan` writes the scoped directory
into the resolved config, so every later step finds the same layout from `cfg.layout`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fulltune import storage

# Names of files that steps write in a local directory first and upload into this layout.
EVAL_FILE = "eval.json"
EVAL_REPORT_FILE = "report.html"


@dataclass(frozen=True)
class RunLayout:
    """The work directory of one run (local path or s3:// prefix)."""

    root: str

    @classmethod
    def for_run(cls, work_dir: str, run_id: str) -> RunLayout:
        """`<work_dir>/<run_id>`: each pipeline run gets a directory of its own."""
        from fulltune.config import ConfigError

        if not work_dir:
            raise ConfigError(
                "work_dir: required (a local directory or s3:// prefix for this run's data and model)"
            )
        if not run_id:
            raise ConfigError("run_id is empty: cannot scope the work directory to this run")
        return cls(storage.join(work_dir, run_id))

    def _at(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    # -- checks --------------------------------------------------------------------------------

    def check_report(self, step: str) -> str:
        """A checking step's HTML report (`validate_data`, `check_tokenizer`), kept whether it passed."""
        return self._at("checks", f"{step}.html")

    # -- plan ----------------------------------------------------------------------------------

    @property
    def plan_json(self) -> str:
        return self._at("plan", "plan.json")

    @property
    def plan_markdown(self) -> str:
        return self._at("plan", "plan.md")

    @property
    def resolved_config(self) -> str:
        """The resolved RunConfig as YAML: what `python -m fulltune.train --config` reads."""
        return self._at("plan", "config.yaml")

    @property
    def deepspeed_config(self) -> str:
        return self._at("plan", "ds_config.json")

    # -- data ----------------------------------------------------------------------------------

    @property
    def shards_dir(self) -> str:
        return self._at("data", "shards")

    def shard_manifest(self, index: int) -> str:
        return storage.join(self.shards_dir, f"shard-{index:05d}.json")

    def shard_file(self, split: str, index: int) -> str:
        return storage.join(self.shards_dir, f"{split}-{index:05d}.parquet")

    @property
    def dataset_manifest(self) -> str:
        return self._at("data", "dataset.json")

    # -- train ---------------------------------------------------------------------------------

    @property
    def model(self) -> str:
        """The tuned model (Hugging Face format, with model_manifest.json written last)."""
        return self._at("train", "model")

    @property
    def tensorboard(self) -> str:
        """TensorBoard event files of rank 0 (training.report_to: tensorboard; training.logging_dir overrides)."""
        return self._at("train", "tensorboard")

    @property
    def checkpoints(self) -> str:
        return self._at("train", "checkpoints")

    @property
    def train_metrics(self) -> str:
        """Per-step metrics, JSON lines."""
        return self._at("train", "metrics.jsonl")

    # -- evaluate ------------------------------------------------------------------------------

    @property
    def eval_dir(self) -> str:
        return self._at("eval")

    @property
    def eval_result(self) -> str:
        return storage.join(self.eval_dir, EVAL_FILE)

    @property
    def eval_report(self) -> str:
        return storage.join(self.eval_dir, EVAL_REPORT_FILE)

    # -- failures ------------------------------------------------------------------------------

    @property
    def failures(self) -> str:
        """Where a step that failed says why (`fulltune.failure`), one file a step."""
        return self._at("failures")

    def failure(self, step: str) -> str:
        return storage.join(self.failures, f"{step}.json")
