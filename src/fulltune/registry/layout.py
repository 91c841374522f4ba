"""Where a registered version lives and the files the registry writes there, named once.

    <registry.uri>/<model name>/v<N>/
        .claim          created first: this writer owns v<N>
        <model files>   weights, config, tokenizer
        model_card.md, lineage.json, eval.json
        manifest.json   written last: the version is committed

Both `store` (which writes versions) and `kubeflow` (which records committed ones) read this, as
does the `fulltune registry` command.
"""

from __future__ import annotations

from fulltune import storage

MANIFEST_FORMAT = "fulltune.registry/v1"
MANIFEST = "manifest.json"
CLAIM = ".claim"
CARD = "model_card.md"
LINEAGE = "lineage.json"
EVAL = "eval.json"
# Names the registry writes itself; a model file of the same name would be shadowed, so it is skipped.
RESERVED = frozenset({MANIFEST, CLAIM, CARD, LINEAGE, EVAL})


class RegistryError(RuntimeError):
    """A model that cannot be registered, or a registry that cannot be read; names the version."""


def model_root(registry_uri: str, name: str) -> str:
    return storage.join(registry_uri, name)


def version_uri(registry_uri: str, name: str, version: int) -> str:
    return storage.join(registry_uri, name, f"v{version}")
