"""training.use_liger_kernel where the trainer cannot honour it: refused naming the field.

Liger's kernels are Triton GPU kernels; CPU machines (and CI) have neither Triton nor the package, so
what runs here is the refusal. The kernels themselves run in the GPU check (`1b/plan`, where plan
turns them on, beside `1b/no-liger`: step time, memory and the first losses, docs/benchmarks.md);
the patching was checked on CPU with liger-kernel 0.8.5 and triton 3.9.0 installed beside this
environment (docs/benchmarks.md).
"""

from __future__ import annotations

import importlib.util

import pytest

from fulltune.train import liger
from tiny_models import tiny_llama_config


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed")
def test_without_the_package_the_field_and_the_fix_are_named():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config())
    with pytest.raises(
        ValueError, match=r"training\.use_liger_kernel: Liger's kernels cannot be imported"
    ) as exc:
        liger.apply(model)
    assert "pip install 'fulltune[liger]'" in str(exc.value) and "or set it false" in str(exc.value)
    assert model.model.norm._get_name() == "LlamaRMSNorm"  # nothing half-patched
