"""`fedseg analyze` on a real federated run: real FEDn processes, ClinicApp, DP-SGD.

One short run (2 tiny phantom clinics, a levels-2 base-4 U-Net, 2 rounds) on its own
network, then analysis.report.write_report over its run folder. The shape follows
tests/test_run_e2e.py::test_real_clinic_app_on_tiny_phantoms; that test's network is a
module fixture of its own file, so this file starts its own (the run owns it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import tiny_real_experiment

from fedseg.analysis.report import write_report
from fedseg.orchestration.experiment import parse_experiment
from fedseg.orchestration.network.ports import free_port
from fedseg.orchestration.runner import RunResult, run_experiment

pytestmark = pytest.mark.slow

CLIENTS = ("clinic-1", "clinic-2")


def _tiny_real_doc() -> dict[str, Any]:
    return {**tiny_real_experiment("tiny-real-report"),
            "network": {"api_port": free_port(), "s3_port": free_port(),
                        "combiners": [{"name": "combiner-1", "port": free_port()}]}}


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    """One real 2-round run, shared by the tests of this file."""
    runs = tmp_path_factory.mktemp("runs")
    exp = parse_experiment(_tiny_real_doc(), source="test_report_real_run")
    return run_experiment(exp, runs)


@pytest.fixture(scope="module")
def report(real_run: RunResult, tmp_path_factory: pytest.TempPathFactory
           ) -> tuple[Path, dict[str, Any]]:
    """write_report over the real run: (report folder, parsed summary.json)."""
    out = tmp_path_factory.mktemp("report")
    files = write_report([real_run.run_dir], out)
    assert files.summary.parent == out
    return out, json.loads(files.summary.read_text())


def test_the_real_run_finishes_cleanly(real_run: RunResult) -> None:
    assert real_run.status == "finished", real_run
    assert real_run.failures == []
    assert real_run.rounds_done == 2


def test_report_html_embeds_its_figures(report: tuple[Path, dict[str, Any]]) -> None:
    out, _ = report
    page = (out / "report.html").read_text()
    pngs = sorted(out.glob("*.png"))
    assert pngs, "no figure files written beside the report"
    # Figures are inline data URIs: one <img> per PNG written beside the page.
    assert page.count('src="data:image/png;base64,') == len(pngs)
    assert "tiny-real-report" in page


def test_summary_has_the_run_with_two_rounds(report: tuple[Path, dict[str, Any]]) -> None:
    _, data = report
    assert [r["name"] for r in data["runs"]] == ["tiny-real-report"]
    run = data["runs"][0]
    assert (run["first_round"], run["last_round"], run["final_round"]) == (1, 2, 2)
    assert sorted(run["clients"]) == list(CLIENTS)
    assert run["missing_clients"] == {}


def test_summary_final_dice_is_a_fraction(report: tuple[Path, dict[str, Any]]) -> None:
    run = report[1]["runs"][0]
    assert run["final_dice_mean"] is not None
    assert 0.0 <= run["final_dice_mean"] <= 1.0
    assert 0.0 <= run["best_dice_mean"] <= 1.0


@pytest.mark.parametrize("client", CLIENTS)
def test_summary_final_epsilon_is_finite_and_positive(
        report: tuple[Path, dict[str, Any]], client: str) -> None:
    eps = report[1]["runs"][0]["final_epsilon"][client]
    assert eps is not None and math.isfinite(eps) and eps > 0


def test_report_shows_a_validation_case_with_contours(
        real_run: RunResult, report: tuple[Path, dict[str, Any]]) -> None:
    """The last global model segments a real validation case of the run's data."""
    from fedseg.analysis.contours import predict_val_case
    from fedseg.analysis.summary import load_run

    out, _ = report
    assert (out / "tiny-real-report_contours.png").stat().st_size > 0
    data = predict_val_case(load_run(real_run.run_dir))
    assert data is not None and data["round"] == 2
    assert data["labels"].shape == data["image"].shape
    assert set(np.unique(data["labels"])) <= set(range(data["organs"].n_classes))
    assert data["masks"]  # ground truth to compare with
