"""CRD schemas as the API server applies them to a create with fieldValidation=Strict, for tests that
validate manifests fulltune builds or the chart renders against a vendored CRD (tests/data/crds)."""

from __future__ import annotations

import functools
import gzip
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRDS = Path(__file__).resolve().parents[1] / "data" / "crds"
# Kubeflow Trainer releases whose TrainJob changes the runtime's pods through another field
# (fulltune.launch.trainjob.OVERRIDES_FIELDS): their CRDs, gzipped.
TRAINER_RELEASES = CRDS / "trainer-releases"
TRAINJOB_CRDS = {
    release: TRAINER_RELEASES / f"{release}-trainer.kubeflow.org_trainjobs.yaml.gz"
    for release in ("v2.0.0", "v2.1.0", "v2.3.0")
}


def strict(schema: Any) -> Any:
    """The schema with unknown fields made errors: additionalProperties false wherever it lists
    properties, except where the CRD keeps unknown fields (x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schema(path: Path, version: str) -> dict[str, Any]:
    """The openAPIV3Schema `version` of the CRD at `path` (YAML, or YAML gzipped)."""
    raw = path.read_bytes()
    text = gzip.decompress(raw) if path.suffix == ".gz" else raw
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    return served["schema"]["openAPIV3Schema"]


def crd_validator(path: Path, version: str) -> jsonschema.Draft7Validator:
    """A validator of `version`'s schema of the CRD at `path`, made strict."""
    return jsonschema.Draft7Validator(strict(crd_schema(path, version)))
