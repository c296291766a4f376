"""Checks that need a CUDA GPU (CI has none): the CUDA path computes what the CPU path does, and bf16 works.

    python bench/cuda_check.py                # prints one line per check; exits 1 if any failed
    python bench/cuda_check.py --device cpu   # a dry run of the script itself (CPU against CPU)

- The Switch layer on CUDA (grouped GEMM layout) against the same layer on the CPU (padded-bmm layout), float32
  with TF32 off: outputs, auxiliary losses, drop patterns and gradients, over the routing options.
- Under bf16 autocast the router still computes float32 logits, the output stays close to float32's.
- Whole models (encoder-decoder and decoder-only) on CUDA against the CPU: loss, gradients, greedy generation.
- The transformers Switch model on identical weights, on CUDA.
"""

from __future__ import annotations

import argparse
import copy
import sys
import traceback
from collections.abc import Callable

import torch

from switchformer import SwitchFFN, build_model, get_preset

DEVICE = torch.device("cuda")
CHECKS: list[tuple[str, Callable[[], str]]] = []


def check(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    """Register a check: a function that returns a detail string or raises."""

    def wrap(fn: Callable[[], str]) -> Callable[[], str]:
        CHECKS.append((name, fn))
        return fn

    return wrap


def run_checks() -> list[str]:
    """Run every check, report each, and return the names of those that failed (one failure hides no other)."""
    failed = []
    for name, fn in CHECKS:
        try:
            ok, detail = True, fn()
        except Exception as error:
            ok, detail = False, f"{type(error).__name__}: {error}"
            traceback.print_exc()
            failed.append(name)
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    return failed


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


LAYER_CASES: dict[str, dict[str, object]] = {
    "top1-cf1.25-groups": {"capacity_factor": 1.25, "group_size": 256},
    "top1-cf1.0-sequence": {"capacity_factor": 1.0, "grouping": "sequence"},
    "top1-dropless": {"dropless": True},
    "top2-cf2.0": {"top_k": 2, "capacity_factor": 2.0},
    "batch-prioritised": {"capacity_factor": 1.0, "priority": "confidence"},
    "next-best-overflow": {"capacity_factor": 1.0, "overflow": "next-best"},
    "gated-gelu-32-experts": {"activation": "gated-gelu", "num_experts": 32, "capacity_factor": 1.25},
}


def layer_matches_cpu(kwargs: dict[str, object]) -> str:
    torch.manual_seed(0)
    options = {"d_model": 64, "d_ff": 128, "num_experts": 8, "router_jitter": 0.0} | kwargs
    cpu = SwitchFFN(**options)
    gpu = copy.deepcopy(cpu).to(DEVICE)
    x = torch.randn(4, 256, 64)
    grad = torch.randn_like(x)
    outs = []
    for layer, inp in ((cpu, x), (gpu, x.to(DEVICE))):
        inp = inp.clone().requires_grad_(True)
        out = layer(inp)
        ((out.hidden_states * grad.to(inp.device)).sum() + out.load_balancing_loss).backward()
        outs.append((out, inp.grad, layer.experts.wi.grad, layer.router.weight.grad))
    (a, ga, wa, ra), (b, gb, wb, rb) = outs
    assert torch.equal(a.routing.keep, b.routing.keep.cpu()), "different tokens dropped"
    errors = {
        "out": rel(b.hidden_states, a.hidden_states),
        "lb": rel(b.load_balancing_loss, a.load_balancing_loss),
        "dx": rel(gb, ga),
        "dwi": rel(wb, wa),
        "drouter": rel(rb, ra),
    }
    worst = max(errors.values())
    assert worst < 1e-4, errors
    return f"worst relative error {worst:.1e}, dropped {float(a.dropped_fraction):.3f}"


for case_name, case in LAYER_CASES.items():
    check(f"layer {case_name}: CUDA == CPU (fp32)")(lambda case=case: layer_matches_cpu(case))


@check("layer under bf16 autocast: float32 router, output close to fp32")
def bf16_layer() -> str:
    torch.manual_seed(0)
    layer = SwitchFFN(d_model=256, d_ff=1024, num_experts=16, router_jitter=0.01).to(DEVICE)
    x = torch.randn(8, 512, 256, device=DEVICE)
    layer.eval()
    with torch.no_grad():
        ref = layer(x)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            low = layer(x)
    assert low.routing.logits.dtype == torch.float32, low.routing.logits.dtype
    assert low.load_balancing_loss.dtype == torch.float32
    agree = float((low.routing.expert_index == ref.routing.expert_index).float().mean())
    assert agree > 0.99, agree
    error = rel(low.hidden_states.float(), ref.hidden_states)
    assert error < 2e-2, error
    layer.train()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = layer(x.requires_grad_(True))
        (out.hidden_states.float().sum() + out.load_balancing_loss).backward()
    assert torch.isfinite(layer.experts.wi.grad).all() and layer.router.weight.grad.dtype == torch.float32
    return f"routing agreement {agree:.4f}, output relative error {error:.1e}, router grad float32"


def model_matches_cpu(preset: str) -> str:
    torch.manual_seed(0)
    config = get_preset(preset).replace(dropout=0.0)  # no randomness in training mode: devices draw differently
    config = config.replace(moe=config.moe.replace(router_jitter=0.0))
    cpu = build_model(config)
    gpu = copy.deepcopy(cpu).to(DEVICE)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (4, 64), generator=g)
    labels = torch.randint(3, config.vocab_size, (4, 16), generator=g)
    kwargs_cpu = {"labels": labels} if config.architecture.value == "encoder-decoder" else {"labels": ids}
    results = []
    for model, device in ((cpu, "cpu"), (gpu, DEVICE)):
        model.train()
        out = model(ids.to(device), **{k: v.to(device) for k, v in kwargs_cpu.items()})
        out.loss.backward()
        grad = torch.cat([p.grad.flatten().cpu() for p in model.parameters() if p.grad is not None])
        model.eval()
        prompt = ids[:2, :8].to(device)
        generated = model.generate(input_ids=prompt, max_new_tokens=12).sequences.cpu()
        results.append((out.loss.detach().cpu(), grad, generated))
    (la, ga, sa), (lb, gb, sb) = results
    loss_error, grad_error = rel(lb, la), rel(gb, ga)
    assert loss_error < 1e-5 and grad_error < 1e-4, (loss_error, grad_error)
    assert torch.equal(sa, sb), "greedy generation differs between CPU and CUDA"
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        gpu.train()
        low = gpu(ids.to(DEVICE), **{k: v.to(DEVICE) for k, v in kwargs_cpu.items()}).loss
    assert abs(float(low) - float(la)) < 0.05 * float(la), (float(low), float(la))
    return f"loss {float(la):.4f} (bf16 {float(low):.4f}), loss err {loss_error:.1e}, grad err {grad_error:.1e}"


for preset_name in ("switch-tiny-8", "switch-lm-tiny-8", "moe-tiny-8-top2"):
    check(f"model {preset_name}: CUDA == CPU (fp32), greedy decoding equal, bf16 loss close")(
        lambda preset_name=preset_name: model_matches_cpu(preset_name)
    )


@check("transformers' Switch model on identical weights, on CUDA")
def hf_parity() -> str:
    import transformers

    from switchformer.interop.hf_config import config_from_hf
    from switchformer.interop.hf_keys import from_hf_state_dict

    torch.manual_seed(0)
    hf_config = transformers.SwitchTransformersConfig(
        vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        num_experts=8, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, expert_capacity=128,
        decoder_start_token_id=0, dropout_rate=0.0,
    )  # fmt: skip
    hf = transformers.SwitchTransformersForConditionalGeneration(hf_config).eval()
    with torch.no_grad():
        hf.encoder.embed_tokens.weight.copy_(hf.shared.weight)
        hf.decoder.embed_tokens.weight.copy_(hf.shared.weight)
    ours = build_model(config_from_hf(hf.config)).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), ours.config))
    hf.to(DEVICE)
    ours.to(DEVICE)
    ids = torch.randint(2, 128, (3, 24), device=DEVICE)
    dec = torch.randint(2, 128, (3, 9), device=DEVICE)
    with torch.no_grad():
        expected = hf(input_ids=ids, decoder_input_ids=dec).logits
        got = ours(ids, decoder_input_ids=dec).logits
    error = float((got - expected).abs().max())
    assert error < 1e-4, error
    return f"max |logit difference| {error:.1e} (no drops: transformers 5.0-5.17 route the flattened batch)"


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    DEVICE = torch.device(parser.parse_args().device)
    torch.backends.cuda.matmul.allow_tf32 = False  # compare float32 with float32
    torch.backends.cudnn.allow_tf32 = False
    failed = run_checks()
    where = torch.cuda.get_device_name() if DEVICE.type == "cuda" else str(DEVICE)
    print(f"\n{len(CHECKS) - len(failed)}/{len(CHECKS)} checks passed on {where}: torch {torch.__version__}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
