"""What a tuned model's contents are, in one digest: the sha256 of its `model_manifest.json`.

Training writes that manifest last, listing every file of the model (weights, config, tokenizer)
with its size and sha256, so its digest changes whenever any of them does. The evaluate step records
it in eval.json, and the register step refuses a model whose digest is not the one evaluated: a
verdict (and a promotion) is only ever applied to the model it was decided on.
"""

from __future__ import annotations

import hashlib

from fulltune import storage

# The file train/recipe.py writes last, listing the model's files: named here, where the evaluate and
# register steps can read it without the training stack (torch, DeepSpeed) the recipe imports.
MODEL_MANIFEST = "model_manifest.json"


def manifest_sha256(model_uri: str) -> str | None:
    """The sha256 of `model_uri`'s model manifest; None for a model without one (not trained by
    fulltune), which can then be named only by its URI."""
    try:
        return hashlib.sha256(storage.read_bytes(storage.join(model_uri, MODEL_MANIFEST))).hexdigest()
    except FileNotFoundError:
        return None
