"""Model FLOPs utilisation (MFU): how much of the devices' peak the training steps achieve.

MFU is reported only on a GPU whose peak dense 16-bit FLOP/s is known (`PEAK_FLOPS`) and only when
training in bf16 or fp16: an fp32 step held against the 16-bit tensor-core peak would mislead.
The model FLOPs are those of the model as written (`flops_per_token`), not of the hardware: time
spent recomputing activations lowers MFU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fulltune.train.engine import Ranks

# Dense (no sparsity) 16-bit tensor-core peak FLOP/s per device, from the vendors' data sheets
# (SXM/OAM parts unless the name says otherwise). Matched against torch.cuda.get_device_name(),
# first match wins, so more specific names come first. Unknown devices: no MFU.
PEAK_FLOPS: list[tuple[str, float]] = [
    (r"\bGB200\b|\bB200\b", 2250e12),
    # the PCIe and NVL parts before the SXM names they contain: lower clocks and power, lower peaks
    (r"\bH(100|800)\b.*\bPCIe\b", 756e12),
    (r"\bH(100|200)\b.*\bNVL\b", 835e12),
    (r"\bH200\b|\bGH200\b", 989e12),
    (r"\bH100\b|\bH800\b", 989e12),
    (r"\bA100\b|\bA800\b", 312e12),
    (r"\bL40S\b", 362e12),
    (r"\bL40\b", 181e12),
    (r"\bL4\b", 121e12),
    (r"\bA10\b", 125e12),
    (r"\bV100\b", 125e12),  # fp16 (V100 has no bf16)
    (r"\bT4\b", 65e12),  # fp16
    (r"\bMI300X\b", 1307e12),
]


# GPUs from before Ampere: tensor cores in fp16 only, no bf16.
NO_BF16 = r"\bV100\b|\bT4\b|\bP100\b|\bRTX ?20\d0\b"


def has_bf16(device_name: str) -> bool:
    """Whether a GPU (by name or resources.gpu_type) computes in bf16; unknown names are assumed to."""
    return re.search(NO_BF16, device_name, flags=re.IGNORECASE) is None


def bf16_missing(device_name: str, capability: tuple[int, int]) -> str | None:
    """Why bf16 training cannot run on this GPU (CUDA compute capability `capability`), naming the
    fix; None when it can. cuBLAS has bf16 matrix products from Ampere (8.0) on."""
    from fulltune.config import BF16_CAPABILITY

    if tuple(capability) >= BF16_CAPABILITY:
        return None
    major, minor = capability
    return (
        f"this machine's GPUs ({device_name}, compute capability {major}.{minor}) have no bf16 (it needs "
        "8.0, Ampere or newer): set training.bf16: false and training.fp16: true"
    )


def peak_flops(device_name: str) -> float | None:
    """Peak dense 16-bit FLOP/s of one device, or None when the device is not in PEAK_FLOPS."""
    for pattern, flops in PEAK_FLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return flops
    return None


def flops_per_token(n_params: int, num_layers: int, attention_width: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weight matmuls (forward 2N, backward 4N) plus 12*L*H*Q*s for
    the attention scores and the weighted sum, H*Q the query heads times their size
    (`attention_width`: the hidden size for most models; PaLM, Chowdhery et al. 2022, appendix B;
    torchtitan counts the same way). Recomputation is not counted: this is model FLOPs, not hardware
    FLOPs."""
    return 6.0 * n_params + 12.0 * num_layers * attention_width * seq_len


def attention_width(cfg) -> int:
    """Query heads x head size of a (text) model config: the width of the attention scores' matmuls.
    Not always the hidden size: Qwen3-0.6B has 16 heads of 128 on a hidden size of 1024, Gemma-7B 16
    of 256 on 3072; counting the hidden size would leave out half and a quarter of their attention."""
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    if not heads:
        return int(hidden)
    return int(heads * (getattr(cfg, "head_dim", None) or hidden // heads))


def mfu(tokens_per_s: float, flops_per_tok: float, peak_per_device: float, world: int) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all `world` devices."""
    return tokens_per_s * flops_per_tok / (peak_per_device * world)


def parameter_count(model) -> int:
    """The model's parameters, whole even where ZeRO-3 holds each rank's partition only."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def matmul_params(model) -> int:
    """Parameters that take part in matmuls: all of them, less an untied input embedding (a lookup)."""
    params = parameter_count(model)
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is not None and (out is None or out.weight is not emb.weight):
        params -= getattr(emb.weight, "ds_numel", emb.weight.numel())
    return params


def model_flops_per_token(model, seq_len: int) -> float:
    """`flops_per_token` for a Hugging Face causal LM (its text config, under ZeRO-3 or not)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    return flops_per_token(matmul_params(model), int(layers), attention_width(cfg), seq_len)


@dataclass(frozen=True)
class MfuMeter:
    """The MFU of one optimizer step from its wall time, for a run whose shape is fixed."""

    tokens_per_step: int  # every position of the global batch is computed (packing leaves little padding)
    flops_per_token: float
    peak_per_device: float | None  # None: no MFU on this device or precision
    world: int

    @classmethod
    def for_run(cls, model, ranks: Ranks, precision: str, global_batch: int, seq_len: int) -> MfuMeter:
        """The meter for `model` trained in `precision` on global batches of `global_batch` sequences
        of `seq_len` tokens."""
        import torch

        peak = None
        if ranks.device.type == "cuda" and precision in ("bf16", "fp16"):
            peak = peak_flops(torch.cuda.get_device_name(ranks.device))
        flops = model_flops_per_token(model, seq_len)
        return cls(global_batch * seq_len, flops, peak, ranks.world)

    def __call__(self, step_time_s: float) -> float | None:
        if not self.peak_per_device:
            return None
        tokens_per_s = self.tokens_per_step / max(step_time_s, 1e-9)
        return mfu(tokens_per_s, self.flops_per_token, self.peak_per_device, self.world)
