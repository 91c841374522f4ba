"""The chunked loss: the same summed cross-entropy and the same gradients as the plain logits path,
without the full logits. Under ZeRO-3 on two ranks: tests/test_train.py, two ranks match one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fulltune.preprocess.dataset import IGNORE_INDEX
from fulltune.train import chunked_loss
from tiny_models import tiny_llama_config


def _plain_sum(hidden, weight, target):
    logits = (hidden @ weight.T).float()
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_and_gradients_equal_the_plain_path(chunk, dtype):
    """Fresh random inputs, ignored positions among them, chunks that do and do not divide the tokens."""
    g = torch.Generator().manual_seed(chunk)
    hidden = torch.randn(37, 24, dtype=dtype, generator=g, requires_grad=True)
    weight = torch.randn(101, 24, dtype=dtype, generator=g, requires_grad=True)
    target = torch.randint(0, 101, (37,), generator=g)
    target[::4] = IGNORE_INDEX
    scale = 0.37  # the trainer scales the summed loss by world * accumulation / N

    (_plain_sum(hidden, weight, target) * scale).backward()
    want = (_plain_sum(hidden, weight, target).detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    got = chunked_loss.linear_cross_entropy_sum(hidden, weight, target, chunk)
    (got * scale).backward()

    torch.testing.assert_close(got.detach(), want[0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(hidden.grad, want[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, want[2], rtol=1e-5, atol=1e-6)
    assert hidden.grad[::4].abs().sum() == 0  # an ignored position gets no gradient


def test_without_gradients_it_only_sums_the_loss():
    hidden, weight = torch.randn(10, 8), torch.randn(30, 8)
    target = torch.randint(0, 30, (10,))
    with torch.no_grad():
        got = chunked_loss.linear_cross_entropy_sum(hidden, weight, target, 3)
    torch.testing.assert_close(got, _plain_sum(hidden, weight, target))


def _tiny_llama(**overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(
        tiny_llama_config(vocab_size=97, hidden_size=32, num_hidden_layers=2, **overrides)
    )


@pytest.mark.parametrize("tied", [True, False])
def test_installed_model_returns_the_summed_loss_with_the_plain_gradients(tied):
    model = _tiny_llama(tie_word_embeddings=tied)
    ids = torch.randint(3, 97, (3, 12))
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX  # a prompt carries no loss
    mask = torch.ones_like(ids)

    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    plain = F.cross_entropy(
        logits.reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    plain.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    chunked_loss.install(model, chunk_tokens=5)
    got = model(input_ids=ids, attention_mask=mask, labels=labels)
    got.backward()
    torch.testing.assert_close(got, plain.detach(), rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_models_whose_logits_are_not_a_plain_head_are_refused_by_name():
    model = _tiny_llama()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="loss_chunk_tokens.*final_logit_softcapping=30.0"):
        chunked_loss.install(model, chunk_tokens=8)
