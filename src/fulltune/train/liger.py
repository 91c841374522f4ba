"""Liger's fused Triton kernels on a loaded Hugging Face model (`training.use_liger_kernel`).

RMSNorm, the gated MLP's activation-and-product and the rotary embedding are each many small
elementwise kernels in eager PyTorch; on a 1B Llama on one H200 such multiplies and copies were 27% of
the GPU's kernel time (docs/benchmarks.md, GPU check run 2). Liger fuses each into one kernel. Its
loss kernels stay off: the loss is fulltune's own (`train/loss.py`, or `chunked_loss`), so the
numbers the trainer reports mean the same with and without Liger.

The model is patched in place after `from_pretrained`, as the Hugging Face Trainer does, through
Liger's per-architecture entry point; ZeRO-3's hooks are untouched (the patched forwards read the
same, gathered, parameters).
"""

from __future__ import annotations

# Liger's own switches: the fused elementwise kernels on, its losses off (fulltune computes the loss)
KERNELS = {
    "rope": True,
    "rms_norm": True,
    "swiglu": True,
    "geglu": True,
    "layer_norm": True,
    "cross_entropy": False,
    "fused_linear_cross_entropy": False,
}


# The dense text models plan turns the kernels on for (`training.use_liger_kernel` None): each has a
# Liger entry point in liger-kernel 0.8.x (its MODEL_TYPE_TO_APPLY_LIGER_FN), and RMSNorm with a gated
# MLP, the activations plan counts for Liger (`plan.layer_activation_bytes`). Multimodal and
# mixture-of-experts types are left to an explicit `true`.
PLAN_MODEL_TYPES = frozenset(
    {
        "gemma",
        "gemma2",
        "gemma3_text",
        "granite",
        "llama",
        "ministral",
        "mistral",
        "olmo2",
        "olmo3",
        "phi3",
        "qwen2",
        "qwen3",
        "smollm3",
    }
)


def entry_points():
    """(Liger's patcher, its table of model types). ValueError naming the field when the package is
    missing."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as exc:
        raise ValueError(
            f"training.use_liger_kernel: Liger's kernels cannot be imported ({exc}); the trainer image "
            "installs the liger-kernel package (pip install 'fulltune[liger]'), or set it false"
        ) from exc
    return _apply_liger_kernel_to_instance, MODEL_TYPE_TO_APPLY_LIGER_FN


def apply(model) -> None:
    """Patch `model` with Liger's kernels. ValueError (naming the field) when the package is missing
    or has no kernels for the model's type."""
    patch, model_types = entry_points()
    model_type = model.config.model_type
    if model_type not in model_types:
        raise ValueError(
            f"training.use_liger_kernel: Liger has no kernels for model type {model_type!r} (it has them "
            f"for {', '.join(sorted(model_types))}); set it false"
        )
    # Liger passes each architecture's patcher only the switches it takes
    patch(model=model, **KERNELS)


def summary(model_type: str) -> str:
    return f"Liger kernels on the {model_type} model: RMSNorm, MLP activation and rotary embeddings fused"
