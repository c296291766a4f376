"""A trained run's checkpoint stands alone: generate from it, convert it to Hugging Face format and back."""

from __future__ import annotations

import pytest

from switchformer.cli.main import main
from tests.cli.test_train import SMALL


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("gen") / "run"
    assert main(["train", "--steps", "2", "--output", str(run), *SMALL]) == 0
    return run


def test_generate_from_a_training_run_folder(trained_run, capsys):
    capsys.readouterr()
    assert main(["generate", str(trained_run), "def <extra_id_0>(self):", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "def <extra_id_0>(self):\n  -> " in out
    assert main(["generate", str(trained_run), "import <extra_id_0>", "--strategy", "beam", "--num-beams", "2",
                 "--max-new-tokens", "4"]) == 0  # fmt: skip


def _generated(trained_run, capsys, *variants: list[str]) -> list:
    """What ``switchformer generate`` prints for one text, once per list of extra arguments."""
    captured = []
    for extra in variants:
        capsys.readouterr()
        assert main(["generate", str(trained_run), "def <extra_id_0>(self):", "--max-new-tokens", "6", *extra]) == 0
        captured.append(capsys.readouterr())
    return captured


def test_generate_with_the_stored_weights_prints_what_packed_weights_decode(trained_run, capsys):
    packed, stored = _generated(trained_run, capsys, [], ["--no-prepack"])
    assert packed.out == stored.out and "  -> " in packed.out


@pytest.mark.slow  # compiles a decoding step
def test_generate_compiled_prints_what_eager_steps_decode_and_no_autotuning_report(trained_run, capsys):
    eager, compiled = _generated(trained_run, capsys, [], ["--compile"])
    assert eager.out == compiled.out and "  -> " in eager.out
    assert "AUTOTUNE" not in compiled.err and "Autotune Choices" not in compiled.err


def test_generate_with_bf16_weights(trained_run, capsys):
    capsys.readouterr()
    text = "def <extra_id_0>(self):"
    assert main(["generate", str(trained_run), text, "--max-new-tokens", "3", "--dtype", "bf16"]) == 0
    assert "def <extra_id_0>(self):\n  -> " in capsys.readouterr().out


def test_convert_to_hf_and_back(trained_run, tmp_path, capsys):
    import transformers

    hf_dir, back_dir = tmp_path / "hf", tmp_path / "back"
    assert main(["convert", str(trained_run), str(hf_dir), "--to", "hf"]) == 0
    assert (hf_dir / "tokenizer.json").is_file()
    model = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(hf_dir)
    assert model.config.num_experts == 8
    assert main(["convert", str(hf_dir), str(back_dir), "--to", "switchformer"]) == 0
    assert "wrote a switchformer checkpoint" in capsys.readouterr().out
