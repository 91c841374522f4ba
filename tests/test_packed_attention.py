"""Packed documents attend only to themselves: a document packed behind another is seen by the model,
in training and in evaluation, as it would be alone (its own positions, nothing before it), unless
`preprocess.attend_across_documents` asks for pretraining's habit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fulltune.evaluate.loss import sequence_loss
from fulltune.preprocess.dataset import IGNORE_INDEX, model_inputs
from fulltune.train.loss import token_loss_sum
from tiny_models import tiny_llama_config

WIDTH = 20
FIRST, SECOND = [1, 7, 9, 12, 30, 2], [1, 5, 22, 8, 17, 41, 19, 2]  # two documents, BOS ... EOS


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(num_hidden_layers=2)).eval()


def packed_row(*docs: list[int]) -> dict[str, torch.Tensor]:
    """One row of a split as preprocess writes it: the documents back to back, right-padded, with
    position ids restarting at each one (0 on padding)."""
    ids = [t for d in docs for t in d]
    pad = WIDTH - len(ids)
    positions = [p for d in docs for p in range(len(d))] + [0] * pad
    row = {
        "input_ids": ids + [0] * pad,
        "labels": ids + [IGNORE_INDEX] * pad,
        "attention_mask": [1] * len(ids) + [0] * pad,
        "position_ids": positions,
    }
    return {k: torch.tensor([v]) for k, v in row.items()}


def logits(model, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs(rows), use_cache=False).logits[0]


def test_a_packed_document_is_seen_as_it_would_be_alone(model):
    row = packed_row(FIRST, SECOND)
    alone = logits(model, packed_row(SECOND))[: len(SECOND)]
    behind = logits(model, row)[len(FIRST) : len(FIRST) + len(SECOND)]
    torch.testing.assert_close(behind, alone, atol=1e-5, rtol=0)

    across = {k: v for k, v in row.items() if k != "position_ids"}  # attend_across_documents
    assert (logits(model, across)[len(FIRST) : len(FIRST) + len(SECOND)] - alone).abs().max() > 1e-2


class Engine:
    """What token_loss_sum calls: DeepSpeed's engine forwards to its module."""

    def __init__(self, module):
        self.module = module

    def __call__(self, **kwargs):
        return self.module(**kwargs)


def test_training_and_evaluation_losses_of_a_packed_row_are_those_of_its_documents_alone(model):
    """Every label of the second document but its first (which the first document's EOS predicts) is
    scored from the second document alone: the packed row's loss is the sum of what each document
    scores on its own, plus that one boundary target."""
    import torch.nn.functional as F

    row = packed_row(FIRST, SECOND)
    with torch.no_grad():
        trained, count = token_loss_sum(Engine(model), row, torch.arange(1), torch.device("cpu"))
    evaluated = sequence_loss(model, row, batch_size=1)

    def alone(doc):
        out = logits(model, packed_row(doc))[: len(doc) - 1]
        return F.cross_entropy(out, torch.tensor(doc[1:]), reduction="sum")

    boundary = F.cross_entropy(logits(model, row)[len(FIRST) - 1], torch.tensor(SECOND[0]), reduction="sum")
    expected = alone(FIRST) + boundary + alone(SECOND)
    assert int(count) == len(FIRST) + len(SECOND) - 1
    assert float(trained) == pytest.approx(float(expected), abs=1e-4)
    assert evaluated.sequence_sums[0] == pytest.approx(float(expected), abs=1e-4)
    assert np.array_equal(evaluated.sequence_tokens, [count])
