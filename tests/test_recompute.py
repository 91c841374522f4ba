"""Selective activation recomputation: which layers recompute, and that it changes nothing numerically."""

from __future__ import annotations

import copy

import pytest
import torch

from fulltune.train import recompute
from tiny_models import tiny_llama_config


def test_recomputed_layers_are_spread_evenly_and_include_the_last():
    assert recompute.evenly_spread(4, 16) == (3, 7, 11, 15)
    assert recompute.evenly_spread(1, 4) == (3,)
    assert recompute.evenly_spread(3, 4) == (1, 2, 3)
    assert recompute.evenly_spread(4, 4) == (0, 1, 2, 3)
    assert recompute.evenly_spread(0, 4) == ()
    assert len(recompute.evenly_spread(5, 32)) == 5


@pytest.fixture()
def four_layers():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(num_hidden_layers=4)).float().train()


def _forward_backward(model, layers_run: list[int] | None = None):
    """One training micro-step; returns the loss and the parameters' gradients. `layers_run` gets the
    index of each decoder layer every time its forward runs (seen from its MLP: transformers
    checkpoints a layer's `forward`, so the layer's own hooks run once, its submodules' each time)."""
    handles = []
    if layers_run is not None:
        for i, layer in enumerate(model.model.layers):
            handles.append(layer.mlp.register_forward_pre_hook(lambda *_, i=i: layers_run.append(i)))
    ids = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for h in handles:
        h.remove()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_only_the_chosen_layers_run_again_in_the_backward_and_the_gradients_are_unchanged(four_layers):
    """2 of 4 layers recomputed: layers 1 and 3 run their forward twice per step, 0 and 2 once; the
    loss and every gradient are those of the model without recomputation."""
    plain = copy.deepcopy(four_layers)
    expected_loss, expected = _forward_backward(plain)

    chosen = recompute.enable(four_layers, 2)
    assert chosen == recompute.Recomputation("LlamaDecoderLayer", (1, 3), 4)
    assert recompute.current(four_layers) == chosen
    assert "2 of 4 x LlamaDecoderLayer (layers 1, 3)" in chosen.describe()
    runs: list[int] = []
    loss, grads = _forward_backward(four_layers, runs)
    assert sorted(runs) == [0, 1, 1, 2, 3, 3]
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_all_layers_by_default_and_none_without_recomputation(four_layers):
    assert recompute.current(four_layers) is None
    full = recompute.enable(four_layers)
    assert full.recomputed == (0, 1, 2, 3)
    assert full.describe() == "recomputing the activations of all 4 x LlamaDecoderLayer"
    runs: list[int] = []
    _forward_backward(four_layers, runs)
    assert sorted(runs) == [0, 0, 1, 1, 2, 2, 3, 3]
