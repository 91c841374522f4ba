"""Activation recomputation, full or selective, on a Hugging Face causal LM.

Full recomputation (`training.gradient_checkpointing`) keeps only each decoder layer's input and runs
the layer's forward again in the backward pass: the activations shrink to ~2*h bytes per token and
layer, and the step does about a third more compute. Selective recomputation
(`training.gradient_checkpointing_layers`) recomputes only some layers and lets the others keep their
activations, so a model that needs a little memory pays a little compute, not a third. plan chooses
the fewest layers that fit the GPU (plan.choose_memory_settings), the cost grows with their number.

The recomputed layers are spread evenly over the stack (a pattern like torchtitan's "every n-th
layer"): memory is the same wherever they sit, and an even spread keeps the live activations level
through the backward pass. Transformers' layers checkpoint their `forward`, not `__call__`, so ZeRO-3's
module hooks stay outside the checkpoint and gather a leaf's parameters again for its recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass

# non-reentrant checkpointing: works with inputs that need no gradient and with ZeRO-3's hooks
CHECKPOINT_KWARGS = {"use_reentrant": False}


@dataclass(frozen=True)
class Recomputation:
    """Which decoder layers recompute: their indices among `total` layers of class `layer_class`."""

    layer_class: str
    recomputed: tuple[int, ...]
    total: int

    def describe(self) -> str:
        if not self.total:
            return f"recomputing the activations of {self.layer_class} wherever it checkpoints them"
        if len(self.recomputed) == self.total:
            return f"recomputing the activations of all {self.total} x {self.layer_class}"
        return (
            f"recomputing the activations of {len(self.recomputed)} of {self.total} x {self.layer_class} "
            f"(layers {', '.join(map(str, self.recomputed))}); the others keep theirs"
        )


def layers_recomputed(enabled: bool, layers: int | None, total: int) -> int:
    """How many of `total` decoder layers recompute: none unless `enabled`, else `layers` (None: all),
    at most `total`. The one rule for the memory plan, the cost estimate and the trainer."""
    return min(layers or total, total) if enabled else 0


def evenly_spread(count: int, total: int) -> tuple[int, ...]:
    """`count` of `total` indices spread evenly, the last layer always among them:
    4 of 16 -> 3, 7, 11, 15."""
    count = max(0, min(count, total))
    return tuple(i for i in range(total) if (i * count) // total != ((i + 1) * count) // total)


def enable(model, layers: int | None = None) -> Recomputation:
    """Turn on recomputation for `layers` of the model's decoder layers (None: all of them)."""
    if hasattr(model, "activation_checkpointing_enable"):  # the newer name; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=CHECKPOINT_KWARGS)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINT_KWARGS)
    blocks = _blocks(model)
    if not blocks:
        if layers is not None:
            raise ValueError(
                f"training.gradient_checkpointing_layers: {type(model).__name__} has no decoder layers that "
                "transformers recomputes one by one; leave it unset to recompute the whole model"
            )
        return Recomputation(type(model).__name__, (), 0)
    chosen = evenly_spread(layers_recomputed(True, layers, len(blocks)), len(blocks))
    for i, block in enumerate(blocks):
        block.gradient_checkpointing = i in chosen
    return current(model)


def current(model) -> Recomputation | None:
    """What the model recomputes now; None where nothing is."""
    blocks = _blocks(model)
    chosen = tuple(i for i, block in enumerate(blocks) if block.gradient_checkpointing)
    if chosen:
        return Recomputation(type(blocks[0]).__name__, chosen, len(blocks))
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        return Recomputation(type(model).__name__, (), 0)
    return None


def _blocks(model) -> list:
    """The repeated blocks transformers checkpoints one by one, in the order the model runs them."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
