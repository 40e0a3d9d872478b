"""``fedseg privacy epsilon|calibrate`` through click's CliRunner."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from fedseg.cli import cli
from fedseg_clinic.privacy.accounting import compute_epsilon

KEYS = {"epsilon_rdp", "epsilon_pld", "epsilon", "noise_multiplier", "delta", "steps",
        "sampling_probability"}


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner(mix_stderr=False).invoke(cli, ["privacy", *args])
    return result.exit_code, result.stdout, result.stderr


def test_epsilon_json_matches_library() -> None:
    code, out, _ = invoke("epsilon", "--patients", "200", "--batch", "4", "--steps", "2500",
                          "--noise", "1.1", "--delta", "1e-3", "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data) == KEYS
    assert data["epsilon_rdp"] == pytest.approx(4.29, abs=0.005)
    assert data["epsilon_pld"] == pytest.approx(3.77, abs=0.005)
    assert data["epsilon"] == data["epsilon_pld"]
    assert (data["steps"], data["sampling_probability"]) == (2500, 0.02)


def test_epsilon_text_names_both_accountants() -> None:
    code, out, _ = invoke("epsilon", "--patients", "100", "--batch", "5", "--steps", "50",
                          "--noise", "1.0", "--delta", "1e-3")
    assert code == 0
    expected = compute_epsilon(100, 5, 50, 1.0, 1e-3)
    assert f"epsilon (RDP) {expected.epsilon_rdp:.4f}" in out
    assert f"epsilon (PLD) {expected.epsilon_pld:.4f}" in out


def test_rounds_times_local_steps_equals_steps() -> None:
    common = ["--patients", "100", "--batch", "5", "--noise", "1.0", "--delta", "1e-3", "--json"]
    _, by_steps, _ = invoke("epsilon", *common, "--steps", "60")
    _, by_rounds, _ = invoke("epsilon", *common, "--rounds", "3", "--local-steps", "20")
    assert json.loads(by_steps) == json.loads(by_rounds)


@pytest.mark.slow  # a noise search over many accountant calls (~10 s)
def test_calibrate_meets_budget() -> None:
    code, out, _ = invoke("calibrate", "--patients", "100", "--batch", "5", "--rounds", "4",
                          "--local-steps", "25", "--epsilon", "2", "--delta", "1e-3", "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data) == KEYS
    assert data["steps"] == 100
    assert data["epsilon"] <= 2.0
    assert data["epsilon"] > 1.99  # the smallest sigma: the budget is (almost) used up
    assert compute_epsilon(100, 5, 100, data["noise_multiplier"] - 1e-3, 1e-3).epsilon > 2.0


@pytest.mark.parametrize(("args", "fragment"), [
    (["epsilon", "--patients", "200", "--batch", "4", "--steps", "10", "--noise", "1",
      "--delta", "0.01"], "delta=0.01"),
    (["epsilon", "--patients", "10", "--batch", "11", "--steps", "10", "--noise", "1",
      "--delta", "1e-3"], "B=11"),
    (["epsilon", "--patients", "10", "--batch", "2", "--steps", "-3", "--noise", "1",
      "--delta", "1e-3"], "steps=-3"),
    (["epsilon", "--patients", "10", "--batch", "2", "--steps", "3", "--noise", "-1",
      "--delta", "1e-3"], "sigma=-1.0"),
    (["epsilon", "--patients", "10", "--batch", "2", "--noise", "1", "--delta", "1e-3"],
     "--steps"),
    (["epsilon", "--patients", "10", "--batch", "2", "--steps", "4", "--rounds", "2",
      "--local-steps", "2", "--noise", "1", "--delta", "1e-3"], "not both"),
    (["calibrate", "--patients", "10", "--batch", "2", "--steps", "3", "--epsilon", "0",
      "--delta", "1e-3"], "epsilon=0.0"),
])
def test_bad_values_give_one_line_and_exit_1(args: list[str], fragment: str) -> None:
    code, out, err = invoke(*args)
    assert code == 1
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("fedseg: error: ")
    assert fragment in lines[0]
