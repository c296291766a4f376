"""A safetensors checkpoint loaded under FSDP2 and expert parallelism: each rank reads only its share of the
files (counted in bytes), and the sharded model's logits are one process's."""

from __future__ import annotations

import pytest
import torch

from switchformer import build_model
from switchformer.interop.checkpoint_io import from_pretrained, save_pretrained
from switchformer.interop.files import read_weights
from tests.parallel import workers
from tests.parallel.launcher import run_and_check
from tests.parallel.workers import tiny_model_config


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """The tiny 8-expert model as a Hugging Face folder of several shards."""
    model = build_model(tiny_model_config(), seed=2)
    return save_pretrained(model, tmp_path_factory.mktemp("hf"), format="hf", max_shard_bytes=40_000)


def _one_process_logits(folder, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)  # the batch of workers.check_streamed_load
    input_ids = torch.randint(2, 64, (4, 7), generator=generator)
    decoder_input_ids = torch.randint(2, 64, (4, 5), generator=generator)
    with torch.no_grad():
        return from_pretrained(folder, dtype=dtype)(input_ids, decoder_input_ids=decoder_input_ids).logits.float()


@pytest.mark.parametrize(
    ("world", "dims", "bf16"),
    [
        pytest.param(2, {"dp_shard": 2}, False, marks=pytest.mark.slow),
        (2, {"expert_parallel": 2}, True),
        (4, {"dp_shard": 2, "expert_parallel": 2}, False),
        pytest.param(4, {"dp_shard": 4}, True, marks=pytest.mark.slow),
    ],
    ids=["fsdp2", "ep2-bf16", "fsdp2xep2", "fsdp4-bf16"],
)
def test_each_rank_reads_its_share_and_the_logits_are_one_processs(hf_folder, world, dims, bf16):
    results = run_and_check(workers.check_streamed_load, world, dims=dims, folder=str(hf_folder), bf16=bf16)
    whole = sum(t.numel() * t.element_size() for t in read_weights(hf_folder).values())
    read = [r["bytes_read"] for r in results]
    assert all(0 < n < whole for n in read), (read, whole)
    assert sum(read) <= whole * 1.05, (read, whole)  # shares, not copies (a few small tensors every rank reads)
    expected = _one_process_logits(hf_folder, torch.bfloat16 if bf16 else torch.float32)
    tolerance = 2e-2 if bf16 else 1e-5  # bf16: the same weights, summed in another order by sharded matmuls
    for r in results:
        torch.testing.assert_close(r["logits"], expected, atol=tolerance, rtol=tolerance)
