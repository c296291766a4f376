"""Sparse upcycling: experts are exact copies of the dense FFN, everything else is copied, routers are fresh; with
the gate pinned to 1 the upcycled model computes exactly what the dense model computes."""

from __future__ import annotations

import math

import pytest
import torch

from switchformer import Activation, ModelConfig, MoEConfig, build_model, from_pretrained
from switchformer.models.upcycle import logit_gap, upcycle, upcycled_config, upcycling_moe
from switchformer.moe.experts import ExpertBatch, Layout
from switchformer.moe.layer import SwitchFFN


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls run several times faster on one thread, above all on a shared, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dense_model(architecture: str = "encoder-decoder", **changes) -> torch.nn.Module:
    shape = {"vocab_size": 61, "d_model": 32, "d_ff": 48, "num_heads": 4, "num_layers": 4, "num_decoder_layers": 3}
    config = ModelConfig(architecture=architecture, dropout=0.0, **(shape | changes))
    torch.manual_seed(0)
    return build_model(config).eval()


NO_DROP = MoEConfig(num_experts=4, dropless=True, router_jitter=0.0)


@pytest.mark.parametrize("architecture", ["encoder-decoder", "decoder-only"])
@pytest.mark.parametrize("sparse_every", [1, 2])
def test_experts_copy_the_dense_ffn_and_every_other_weight_is_unchanged(architecture, sparse_every):
    dense = dense_model(architecture)
    sparse = upcycle(dense, moe=NO_DROP, sparse_every=sparse_every)
    assert sparse.config == dense.config.replace(moe=NO_DROP, sparse_every=sparse_every)
    dense_state, sparse_state = dense.state_dict(), sparse.state_dict()
    switch = [name for name, m in sparse.named_modules() if isinstance(m, SwitchFFN)]
    stacks = 1 if architecture == "decoder-only" else 2
    assert len(switch) == ({1: 7, 2: 3}[sparse_every] if stacks == 2 else {1: 4, 2: 2}[sparse_every])
    for name in switch:
        experts = sparse.get_submodule(name).experts
        ffn = dense.get_submodule(name)
        for e in range(4):
            assert torch.equal(experts.wi[e], ffn.wi.weight.t()) and torch.equal(experts.wo[e], ffn.wo.weight.t())
    copied = {k for k in sparse_state if not any(k.startswith(f"{name}.") for name in switch)}
    assert copied == set(dense_state) - {f"{n}.{w}.weight" for n in switch for w in ("wi", "wo")}
    for key in copied:
        assert torch.equal(sparse_state[key], dense_state[key]), key
    # copies, not views: training one expert (or the dense model) leaves the others untouched
    experts = sparse.get_submodule(switch[0]).experts
    with torch.no_grad():
        experts.wi[0].add_(1.0)
    assert torch.equal(experts.wi[1], dense.get_submodule(switch[0]).wi.weight.t())


def test_routers_are_fresh_with_the_papers_init_and_seeded():
    dense = dense_model(num_layers=8, num_decoder_layers=8)
    a, b, c = (upcycle(dense, moe=NO_DROP, seed=seed) for seed in (0, 0, 1))
    routers = [m.router.weight for m in a.modules() if isinstance(m, SwitchFFN)]
    weights = torch.cat([w.flatten() for w in routers])
    std = math.sqrt(0.1 / 32)
    # the paper's std (within sampling error of 1024 draws), truncated at 2 std of the normal drawn from
    assert weights.abs().max() <= 2 * std / 0.87962566103423978 and 0.94 * std < weights.std() < 1.06 * std
    assert len({tuple(w.flatten()[:3].tolist()) for w in routers}) == len(routers)  # each router drawn anew
    assert torch.equal(a.state_dict()["encoder.blocks.1.ffn.router.weight"],
                       b.state_dict()["encoder.blocks.1.ffn.router.weight"])  # fmt: skip
    assert not torch.equal(a.state_dict()["encoder.blocks.1.ffn.router.weight"],
                           c.state_dict()["encoder.blocks.1.ffn.router.weight"])  # fmt: skip


@pytest.mark.parametrize("activation", [Activation.RELU, Activation.GATED_GELU])
def test_each_expert_computes_the_dense_ffn(activation):
    dense = dense_model(activation=activation)
    sparse = upcycle(dense, moe=NO_DROP)
    x_TD = torch.randn(5, 32)
    for name, module in sparse.named_modules():
        if isinstance(module, SwitchFFN):
            rows = x_TD.repeat(4, 1)  # every expert gets the same 5 tokens
            batch = ExpertBatch(rows, Layout.PADDED, capacity=5, tokens_per_expert=torch.full((4,), 5))
            y_ETD = module.experts(batch).view(4, 5, 32)
            expected = dense.get_submodule(name)(x_TD)
            for e in range(4):
                torch.testing.assert_close(y_ETD[e], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("architecture", ["encoder-decoder", "decoder-only"])
def test_with_the_gate_pinned_to_one_the_upcycled_model_computes_the_dense_model(architecture):
    """The Switch output is p_i(x) * E_i(x): a router bias of 100 for one expert makes p_i exactly 1.0 in float32
    (the others get e^-100), and since every expert equals the dense FFN the whole model equals the dense one."""
    dense = dense_model(architecture)
    sparse = upcycle(dense, moe=NO_DROP.replace(router_bias=True), sparse_every=1).eval()
    with torch.no_grad():
        for module in sparse.modules():
            if isinstance(module, SwitchFFN):
                module.router.weight.zero_()
                module.router.bias.copy_(torch.tensor([0.0, 100.0, 0.0, 0.0]))
    ids = torch.randint(2, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(2, 61, (2, 5), generator=torch.Generator().manual_seed(1))
    labels = labels if architecture == "encoder-decoder" else ids
    ours, theirs = sparse(ids, labels=labels), dense(ids, labels=labels)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    assert all(int(r.stats.tokens_per_expert[1]) == r.stats.tokens_per_expert.sum() for r in ours.router)
    # With the fresh routers instead, each token's output is the dense FFN's scaled by its gate: not equal.
    fresh = upcycle(dense, moe=NO_DROP, sparse_every=1).eval()
    assert not torch.allclose(fresh(ids, labels=labels).logits, theirs.logits, atol=1e-3)


def test_checkpoints_round_trip_and_bad_inputs_are_refused(tmp_path):
    dense = dense_model()
    dense.save_pretrained(tmp_path / "dense")
    from_path = upcycle(from_pretrained(tmp_path / "dense"), moe=NO_DROP)
    from_path.save_pretrained(tmp_path / "sparse")
    reloaded = from_pretrained(tmp_path / "sparse")
    assert reloaded.config == from_path.config
    for key, tensor in from_path.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[key]), key
    with pytest.raises(ValueError, match="already a Switch model"):
        upcycle(from_path, moe=NO_DROP)
    with pytest.raises(ValueError, match="makes no layer sparse"):
        upcycled_config(dense.config.replace(num_layers=1, num_decoder_layers=1), NO_DROP)


@pytest.mark.parametrize("architecture", ["encoder-decoder", "decoder-only"])
def test_the_default_upcycling_routing_starts_where_the_dense_model_ended(architecture):
    """upcycling_moe: straight-through gate and dropless routing, so logits equal the dense model's in float32
    with fresh routers and nothing dropped, while the router still gets the paper's gradient."""
    dense = dense_model(architecture)
    moe = upcycling_moe(4)
    assert moe.gate.value == "straight-through" and moe.dropless
    sparse = upcycle(dense, moe=moe, sparse_every=1)
    gap = logit_gap(dense, sparse)
    assert gap.relative <= 1e-5 and gap.dropped_fraction == 0.0 and gap.largest_logit > 1.0
    ids = torch.randint(2, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(2, 61, (2, 5), generator=torch.Generator().manual_seed(1))
    labels = labels if architecture == "encoder-decoder" else ids
    with torch.no_grad():
        ours, theirs = sparse(ids, labels=labels), dense(ids, labels=labels)
    scale = float(theirs.logits.abs().max())
    assert float((ours.logits - theirs.logits).abs().max()) <= 1e-5 * scale
    assert all(len(set(r.stats.tokens_per_expert.tolist())) > 1 for r in ours.router)  # routed, not all to one
    sparse.train()
    sparse(ids, labels=labels).loss.backward()
    routers = [m.router.weight.grad for m in sparse.modules() if isinstance(m, SwitchFFN)]
    assert all(g is not None and float(g.abs().sum()) > 0 for g in routers)


def test_the_papers_gate_is_kept_as_an_option_and_its_gap_measured():
    dense = dense_model()
    paper = upcycle(dense, moe=upcycling_moe(4, gate="probability"), sparse_every=1)
    gap = logit_gap(dense, paper)
    assert gap.relative > 1e-3 and gap.dropped_fraction == 0.0
    capped = upcycle(dense, moe=upcycling_moe(4, dropless=False, eval_capacity_factor=0.5, min_capacity=1))
    assert logit_gap(dense, capped).dropped_fraction > 0.1  # half the tokens fit: dropped ones are reported
    assert not paper.training and dense.training is False  # logit_gap leaves the modes as it found them
