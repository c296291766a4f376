from __future__ import annotations

import json

from switchformer.cli.main import main


def test_info_json_reports_paper_sizes(capsys):
    assert main(["info", "t5-base", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"params_total", "params_active", "flops_per_token"}
    assert abs(data["params_total"] - 223e6) / 223e6 < 0.02
    assert data["params_active"] == data["params_total"]


def test_info_table_and_overrides(capsys):
    assert main(["info", "switch-tiny-8", "--set", "moe.num_experts=16"]) == 0
    out = capsys.readouterr().out
    assert "16 / 1" in out and "parameters, total" in out


def test_info_unknown_preset_is_a_clear_error(capsys):
    assert main(["info", "switch-base-7"]) == 2
    err = capsys.readouterr().err
    assert "switch-base-7" in err and "switch-base-8" in err
