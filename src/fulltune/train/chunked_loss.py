"""Cross-entropy from the final hidden states in chunks: the full logits are never materialised.

The plain path computes `lm_head(hidden)` for every position (bf16 logits, tokens x vocabulary), then
an fp32 copy, its log-probabilities and their gradient: about 12 bytes per logit, 12 GiB for 4 x 2048
tokens of a 128k vocabulary. Here the forward walks the tokens `chunk_tokens` at a time: logits of one
chunk (fp32), their log-sum-exp, the loss, and at once the gradients with respect to the hidden states
and the head's weight (softmax minus the one-hot target). Backward only scales the stored gradients.
The matrix products are the plain path's (forward, grad-input and grad-weight), so no FLOPs are added;
memory is one chunk of logits and the gradients of the hidden states and of the head. The same idea as Liger's fused linear cross-entropy, in plain torch: it runs on CPU for the
tests and on any GPU.

Under ZeRO-3 the head's weight is partitioned and only gathered while its module runs: `install`
registers it as an external parameter of the model (DeepSpeed then gathers it for the model's whole
forward), and replaces the model's forward with one that returns the summed loss. Since the gradients
are computed in the forward, the weight is not needed again in the backward, after DeepSpeed has
released it.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from fulltune.preprocess.dataset import IGNORE_INDEX
from fulltune.train.loss import next_token_targets


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over positions of cross_entropy(hidden @ weight.T, target), ignoring IGNORE_INDEX targets."""

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk_tokens: int):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # in the weight's dtype, as the plain path's gradient is: one rounding per chunk (each product
        # accumulates in fp32), and no fp32 copy of a head that can be 128k x 4096
        grad_weight = torch.zeros_like(weight) if need_weight else None
        for lo in range(0, hidden.shape[0], chunk_tokens):
            h, t = hidden[lo : lo + chunk_tokens], target[lo : lo + chunk_tokens]
            keep = t != IGNORE_INDEX
            safe_t = torch.where(keep, t, 0)
            logits = (h @ weight.T).float()  # the head in the weight's dtype, upcast as the plain path does
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe_t[:, None]).squeeze(1)
            total += ((lse - picked) * keep).sum()
            if not (need_hidden or need_weight):
                continue
            # d(sum of losses)/d(logits) = softmax - one_hot(target) on kept rows, 0 on the others;
            # computed in the logits' buffer, the largest tensor here
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(len(t), device=t.device), safe_t] -= 1.0
            grad = (grad * keep[:, None]).to(hidden.dtype)
            if need_hidden:
                grad_hidden[lo : lo + chunk_tokens] = grad @ weight
            if need_weight:
                grad_weight.addmm_(grad.T, h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = None if grad_hidden is None else grad_hidden * grad_out.to(grad_hidden.dtype)
        gw = None if grad_weight is None else grad_weight * grad_out.to(grad_weight.dtype)
        return gh, gw, None, None


def linear_cross_entropy_sum(hidden, weight, target, chunk_tokens: int):
    """Summed loss of `hidden` [N, h] through the head `weight` [V, h] against `target` [N]
    (IGNORE_INDEX: no loss), `chunk_tokens` positions at a time."""
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, target, chunk_tokens)


# Config fields of architectures whose logits are not the plain `lm_head(hidden)`: the chunked loss
# would compute another function, so `install` refuses them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def unsupported_reason(model) -> str | None:
    """Why the chunked loss cannot stand in for this model's own logits, or None if it can."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in _LOGIT_TRANSFORMS:
        if getattr(cfg, name, None) not in (None, 1, 1.0):
            return f"its config sets {name}={getattr(cfg, name)!r} (logits are not the plain lm_head output)"
    head = model.get_output_embeddings()
    if head is None or not isinstance(head, torch.nn.Linear):
        return "it has no linear output head"
    if head.bias is not None:
        return "its output head has a bias"
    return None


def install(model, chunk_tokens: int) -> None:
    """Make `model(input_ids=, attention_mask= or position_ids=, labels=)` return the summed
    next-token loss, computed from the final hidden states `chunk_tokens` positions at a time
    (labels: IGNORE_INDEX = no loss; position i predicts labels[i + 1]). Raises ValueError naming why if the model's logits are not a
    plain linear head."""
    reason = unsupported_reason(model)
    if reason:
        raise ValueError(f"training.loss_chunk_tokens cannot be used with {type(model).__name__}: {reason}")
    weight = model.get_output_embeddings().weight
    if hasattr(weight, "ds_id"):  # partitioned by ZeRO-3: gathered for the model's whole forward
        import deepspeed

        deepspeed.zero.register_external_parameter(model, weight)
    model.forward = types.MethodType(_loss_forward, model)
    model.loss_chunk_tokens = chunk_tokens


def _loss_forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, **_ignored: Any):
    hidden = self.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    hidden = hidden.reshape(-1, hidden.size(-1))  # a view: the labels are shifted, not the states
    target = next_token_targets(labels).reshape(-1)
    return linear_cross_entropy_sum(
        hidden, self.get_output_embeddings().weight, target, self.loss_chunk_tokens
    )
