"""The champion: the version the registry's `production` pointer names, which a candidate of
`evaluation.compare_to: registered` must not be worse than.

It is scored on this run's evaluation sets, which are token ids of the run's tokenizer. A champion
with another tokenizer would be scored on ids that stand for other text: its loss then says nothing
(a worse candidate beats it easily), or the ids run past its vocabulary and the scoring fails. Such
a champion is refused, naming the difference: by plan, before any training, and by evaluate, since
production may have moved in between.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from fulltune.config import ConfigError, RunConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChampionRef:
    """What `evaluation.compare_to` resolved to: the promoted version to compare with, or why none;
    `refused` says why the version in production cannot be compared with this run's candidate."""

    compare_to: str
    version: int | None = None
    uri: str | None = None
    note: str = ""
    refused: str = ""


def resolve(cfg: RunConfig) -> ChampionRef | None:
    """`evaluation.compare_to: registered`: the version the production pointer names now, or a note
    that nothing is promoted yet; None with compare_to base."""
    from fulltune.registry import pointers
    from fulltune.registry.layout import version_uri

    if cfg.evaluation.compare_to != "registered":
        return None
    if not cfg.registry.uri:
        raise ConfigError("evaluation.compare_to: registered needs registry.uri (where the champion is)")
    name = cfg.model.name
    record = pointers.current(cfg.registry.uri, name, pointers.PRODUCTION)
    if record is None:
        return ChampionRef(
            "registered", note=f"no promoted version of {name} yet: compared with the base model only"
        )
    uri = version_uri(cfg.registry.uri, name, record.version)
    log.info("champion: %s v%d (production since %s, %s)", name, record.version, record.at, record.reason)
    refused = ""
    if why := tokenizer_mismatch(cfg, uri):
        refused = (
            f"v{record.version} in production cannot be compared with this run's model: {why}, and the "
            "domain loss is per token of this run's tokenizer. To replace it with a model of another "
            "tokenizer, run with evaluation.compare_to: base and promote the version by hand "
            "(fulltune registry promote)"
        )
    return ChampionRef("registered", record.version, uri, f"production since {record.at}", refused)


def tokenizer_mismatch(cfg: RunConfig, champion_uri: str) -> str:
    """How the champion's tokenizer reads token ids otherwise than the run's; "" when alike (or
    when the champion has no tokenizer beside it to tell)."""
    from fulltune.hf import load_config, load_tokenizer

    trust = cfg.model.trust_remote_code
    run = load_tokenizer(cfg.tokenizer_uri, trust)
    try:
        theirs = load_tokenizer(champion_uri, trust)
    except (OSError, ValueError) as exc:
        log.warning("%s: no tokenizer to compare with this run's (%s)", champion_uri, exc)
        return ""
    ours, their_vocab = run.get_vocab(), theirs.get_vocab()
    if their_vocab != ours:
        if len(their_vocab) != len(ours):
            return f"its tokenizer has {len(their_vocab):,} tokens, this run's ({cfg.tokenizer_uri}) {len(ours):,}"
        other = sum(their_vocab.get(token) != i for token, i in ours.items())
        return f"its tokenizer gives {other:,} of the {len(ours):,} tokens other ids than this run's ({cfg.tokenizer_uri})"
    if _splitting(theirs) != _splitting(run):
        return f"its tokenizer splits text otherwise than this run's ({cfg.tokenizer_uri}): same vocabulary, other merges or normalisation"
    rows = getattr(load_config(champion_uri, trust), "vocab_size", None)
    if rows is not None and rows < len(ours):
        return f"its embedding has {rows:,} rows for this run's {len(ours):,} token ids"
    return ""


def _splitting(tok: Any) -> str:
    """What decides how text becomes tokens: the fast tokenizer's normaliser, pre-tokeniser and
    model (its merges); not its padding or post-processing, which a trained run may set otherwise."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return ""
    spec = json.loads(backend.to_str())
    return json.dumps({k: spec.get(k) for k in ("normalizer", "pre_tokenizer", "model")}, sort_keys=True)
