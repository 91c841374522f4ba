"""CRD schemas as the API server applies them to a create with fieldValidation=Strict, for tests that
validate manifests fulltune builds or the chart renders against a vendored CRD (tests/data/crds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRDS = Path(__file__).resolve().parents[1] / "data" / "crds"


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


def crd_validator(path: Path, version: str) -> jsonschema.Draft7Validator:
    """A validator of `version`'s schema of the CRD at `path`, made strict."""
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    return jsonschema.Draft7Validator(strict(served["schema"]["openAPIV3Schema"]))
