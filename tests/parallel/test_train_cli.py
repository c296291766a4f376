"""`switchformer train` over several gloo ranks, in every layout, logs and saves what one process does on the same
global batch; a run moves between layouts with --resume; two torchrun nodes train together."""

from __future__ import annotations

import pytest

from switchformer.cli.main import main
from switchformer.training.metrics import read_metrics
from tests.parallel import runs
from tests.parallel.launcher import free_port

LAYOUTS = {
    "fsdp2": (2, ["--dp-shard", "2"]),
    "ep2": (2, ["--expert-parallel", "2"]),
    "fsdp2-ep2": (4, ["--dp-shard", "2", "--expert-parallel", "2"]),
    "hsdp2x2": (4, ["--dp-replicate", "2", "--dp-shard", "2"]),
}


def _assert_reproduces(run, reference, steps: int) -> None:
    logged = read_metrics(run)
    runs.assert_same_losses(logged, read_metrics(reference)[:steps])
    runs.assert_same_gradients_at_step_1(run, reference)
    runs.assert_same_weights(run, reference, steps)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_matches_one_process(tmp_path, one_process_run, layout):
    """Step 1 starts from the same weights (the same seed in any layout), so its loss and every gradient agree to
    float32 rounding; later losses to 1e-5 (measured 1e-6), the weights to the optimizer's drift bound."""
    world, flags = LAYOUTS[layout]
    run = tmp_path / "run"
    runs.train_on_ranks(world, runs.train_args(*flags, steps=4), run)
    _assert_reproduces(run, one_process_run(), 4)
    assert runs.checkpoint_steps(run) == [1, 2, 3, 4]


def test_adafactor_under_expert_parallelism_matches_one_process_and_resumes_in_one(tmp_path, one_process_run):
    """ShardedAdafactor takes its norms over whole weights; its state is torch's Adafactor state, compared at step 1
    as AdamW's, and torch's Adafactor in one process resumes from it (two more steps, as uninterrupted)."""
    run = tmp_path / "run"
    runs.train_on_ranks(2, runs.train_args("--optimizer", "adafactor", "--expert-parallel", "2", steps=4), run)
    reference = one_process_run("--optimizer", "adafactor", steps=6)
    _assert_reproduces(run, reference, 4)
    assert main(["train", "--resume", "--steps", "6", "--no-progress", "--output", str(run)]) == 0
    runs.assert_same_losses(read_metrics(run), read_metrics(reference))
    runs.assert_same_weights(run, reference, 6)


def test_router_jitter_matches_one_process_in_any_layout(tmp_path, one_process_run):
    """Jitter draws per global row (moe.router.jitter_by_row): on 4 ranks, each micro-batch of one row draws the
    noise one process draws for that row of its micro-batch of four."""
    run = tmp_path / "run"
    flags = ["--micro-batches", "2"]
    runs.train_on_ranks(4, runs.train_args(*flags, *LAYOUTS["fsdp2-ep2"][1], steps=4, jitter=True), run)
    reference = one_process_run(*flags, jitter=True, steps=4)
    _assert_reproduces(run, reference, 4)
    # The noise moved tokens between experts: without it the step-1 gradients differ beyond the check's tolerance.
    with pytest.raises(AssertionError):
        runs.assert_same_gradients_at_step_1(run, one_process_run())


@pytest.mark.parametrize(
    "grouping",
    [
        pytest.param(["--set", "moe.grouping=batch"], marks=pytest.mark.slow),
        ["--set", "moe.group_size=128"],
        ["--set", "moe.grouping=batch", "--micro-batches", "2"],  # each micro-batch's rows as in one process
    ],
    ids=["batch", "group-size-128", "batch-micro-batches"],
)
def test_routing_groups_spanning_ranks_route_as_in_one_process(tmp_path, one_process_run, grouping):
    """A group of the whole batch spans all 4 ranks' slices; groups of 128 tokens span two encoder slices (64
    tokens each) and all four decoder ones (16 target tokens each, 64 in all): the ranks exchange their claim
    counts (moe.batch_slices) and keep what one process keeps."""
    run = tmp_path / "run"
    flags = ["--set", "moe.grouping=tokens", *grouping]
    runs.train_on_ranks(4, runs.train_args(*flags, *LAYOUTS["fsdp2-ep2"][1], steps=3), run)
    _assert_reproduces(run, one_process_run(*flags, steps=3), 3)


@pytest.mark.slow
def test_resharding_4_2_1_4_with_resume_reproduces_the_uninterrupted_run(tmp_path, one_process_run):
    """Two steps per launch: 4 ranks (fsdp2 x ep2, DCP checkpoints), 2 ranks (ep2), one process (reads the DCP
    checkpoint whole, writes safetensors), 4 ranks (hsdp 2x2, shards the one-file checkpoint)."""
    run = tmp_path / "run"
    runs.train_on_ranks(4, runs.train_args(*LAYOUTS["fsdp2-ep2"][1], steps=2), run)
    resume = ["--resume", "--no-progress"]
    runs.train_on_ranks(2, [*resume, "--steps", "4", *LAYOUTS["ep2"][1]], run)
    assert main(["train", *resume, "--steps", "6", "--output", str(run)]) == 0
    runs.train_on_ranks(4, [*resume, "--steps", "8", *LAYOUTS["hsdp2x2"][1]], run)
    reference = one_process_run()
    runs.assert_same_losses(read_metrics(run), read_metrics(reference))
    runs.assert_same_weights(run, reference, 8)
    assert runs.checkpoint_steps(run) == list(range(1, 9))


@pytest.mark.slow
def test_8_ranks_2_replicas_x_fsdp2_x_ep2_with_jitter(tmp_path, one_process_run):
    run = tmp_path / "run"
    flags = ["--dp-replicate", "2", "--dp-shard", "2", "--expert-parallel", "2"]
    runs.train_on_ranks(8, runs.train_args(*flags, steps=4, jitter=True), run)
    _assert_reproduces(run, one_process_run(jitter=True, steps=4), 4)


def test_two_torchrun_nodes_on_one_machine_train_together(tmp_path, one_process_run):
    """Two launchers meet through c10d rendezvous, as two nodes would: replicas across the nodes (HSDP), FSDP inside
    each; the job logs one process's losses."""
    run, endpoint = tmp_path / "run", f"127.0.0.1:{free_port()}"
    command = [
        *runs.torchrun_command(2, nnodes=2, endpoint=endpoint),
        "-m",
        "switchformer",
        "train",
        *runs.train_args(*LAYOUTS["hsdp2x2"][1], steps=4),
        "--output",
        str(run),
    ]
    nodes = [runs.launch(command, tmp_path / f"node{n}.log") for n in range(2)]
    codes = [runs.finish(node, tmp_path / f"node{n}.log") for n, node in enumerate(nodes)]
    assert codes == [0, 0], [runs.tail(tmp_path / f"node{n}.log") for n in range(2)]
    _assert_reproduces(run, one_process_run(), 4)


def test_a_layout_without_torchrun_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--expert-parallel", "2", "--dp-shard", "2", "--output", str(tmp_path / "r")]) == 2
    assert "torchrun --nproc-per-node 4" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
