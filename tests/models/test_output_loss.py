"""The models' loss without logits (``return_logits=False``: the chunked output layer) against the loss on logits."""

from __future__ import annotations

import pytest
import torch

from switchformer import SwitchTransformer, build_model
from switchformer.training.evaluation import model_forward


@pytest.mark.parametrize("arch", ["encoder-decoder", "decoder-only"])
@pytest.mark.parametrize("tied", [True, False])
def test_models_without_logits_give_the_same_loss_and_gradients(make_config, arch, tied):
    torch.manual_seed(0)
    model = build_model(make_config(arch, tie_word_embeddings=tied)).train()
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(2, 97, (3, 10), generator=g), torch.randint(2, 97, (3, 7), generator=g)
    labels[0, -2:] = -100  # padding
    if not isinstance(model, SwitchTransformer):
        labels = ids.clone()
    runs = []
    for return_logits in (True, False):
        model.zero_grad()
        out = model(ids, labels=labels, return_logits=return_logits)
        out.loss.backward()
        runs.append((out, [p.grad.clone() for p in model.parameters()]))
    (full, full_grads), (fused, fused_grads) = runs
    assert full.logits is not None and fused.logits is None
    torch.testing.assert_close(fused.loss, full.loss, rtol=1e-6, atol=1e-6)
    assert int(fused.num_label_tokens) == int(full.num_label_tokens)
    for a, b in zip(fused_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_model_forward_skips_the_logits_when_asked(make_config):
    model = build_model(make_config("decoder-only"))
    batch = {"input_ids": torch.randint(2, 97, (2, 8)), "labels": torch.randint(2, 97, (2, 8))}
    cpu = torch.device("cpu")
    assert model_forward(model, batch, cpu, None, return_logits=False).logits is None
    assert model_forward(model, batch, cpu, None).logits.shape == (2, 8, 97)
