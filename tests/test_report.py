"""The report from hand-made round logs: files, summary.json, HTML, CLI, headless Chromium."""

from __future__ import annotations

import base64
import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import fedseg_cli, make_run

from fedseg.analysis import plots, report, summary
from fedseg_clinic.errors import FedsegError

NAN = math.nan
CHROMIUM = Path("/usr/bin/chromium")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"



def fed_rows(scale: float, rounds: int = 3, drop: tuple[int, ...] = ()) -> list[tuple]:
    """Two clients, c2 absent in the rounds in ``drop``; c1 does not label the esophagus."""
    rows: list[tuple] = []
    for rnd in range(1, rounds + 1):
        rows += [(rnd, "global", "round_seconds", 10.0),
                 (rnd, "global", "aggregation_seconds", 1.0)]
        for client, offset in (("c1", 0.0), ("c2", 0.1)):
            if client == "c2" and rnd in drop:
                continue
            dice = scale * rnd / rounds + offset
            rows += [(rnd, client, "val_dice_mean", dice), (rnd, client, "n_val", 2.0),
                     (rnd, client, "train_loss", 1.0 / rnd), (rnd, client, "val_loss", 1.1 / rnd),
                     (rnd, client, "epsilon", 0.5 * rnd), (rnd, client, "train_seconds", 6.0),
                     (rnd, client, "validate_seconds", 2.0),
                     (rnd, client, "val_dice_heart", dice),
                     (rnd, client, "val_dice_esophagus", NAN if client == "c1" else dice)]
    return rows


@pytest.fixture()
def runs(tmp_path: Path) -> list[Path]:
    return [
        make_run(tmp_path / "fedavg", fed_rows(0.6, drop=(2,)),
                 config={"privacy": {"target_epsilon": 1.5}}),
        make_run(tmp_path / "fedopt <b>", fed_rows(0.8, rounds=2), name="fedopt <b>"),
        make_run(tmp_path / "pooled", [(1, "pooled", "val_dice_mean", 0.8),
                                       (2, "pooled", "val_dice_mean", 0.9)], kind="pooled"),
    ]


def test_report_files_summary_and_html(tmp_path: Path, runs: list[Path]) -> None:
    out = tmp_path / "report"
    files = report.write_report(runs, out, target_fraction=0.5)
    # 2 comparison figures (there is a DP run) + 4 per run
    assert len(files.figures) == 2 + 3 * 4
    assert {p.name for p in files.figures} >= {"compare_dice.png", "privacy_utility.png",
                                               "fedavg_dice.png", "fedopt_b_round_time.png"}
    for path in files.figures:
        assert path.read_bytes().startswith(PNG_MAGIC)
    data = json.loads(files.summary.read_text())
    assert data["target_dice"] == pytest.approx(0.45)
    assert [e["name"] for e in data["runs"]] == ["fedavg", "fedopt <b>", "pooled"]
    fedavg = data["runs"][0]
    # round 2 has only c1: 0.4; round 1: (0.2 + 0.3) / 2; round 3: (0.6 + 0.7) / 2
    assert fedavg["final_dice_mean"] == pytest.approx(0.65)
    assert fedavg["rounds_to_target"] == 3
    assert fedavg["dice_auc"] == pytest.approx((0.25 + 0.4 + 0.65) / 3)
    assert fedavg["missing_clients"] == {"2": ["c2"]}
    # config target_epsilon first, else the largest final client epsilon, None without DP
    assert [e["epsilon"] for e in data["runs"]] == [1.5, 1.0, None]
    page = files.html.read_text()
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(files.figures)
    assert base64.b64decode(embedded[0]) == files.figures[0].read_bytes()
    assert "fedopt &lt;b&gt;" in page and "fedopt <b>" not in page
    assert "epsilon (config target, else max final)" in page
    assert "http://" not in page and "https://" not in page
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_single_run_has_no_comparison(tmp_path: Path, runs: list[Path]) -> None:
    files = report.write_report(runs[:1], tmp_path / "one", target_dice=0.35)
    assert sorted(p.name for p in files.figures) == [
        "fedavg_dice.png", "fedavg_epsilon.png", "fedavg_losses.png", "fedavg_round_time.png"]
    assert json.loads(files.summary.read_text())["runs"][0]["rounds_to_target"] == 2


def test_bad_input_writes_nothing(tmp_path: Path, runs: list[Path]) -> None:
    (runs[1] / "rounds.csv").write_text("round,client,metric,value\n1,c1,oops\n")
    out = tmp_path / "report"
    with pytest.raises(FedsegError, match=r"rounds\.csv:2: expected 4 fields"):
        report.write_report(runs, out)
    assert not out.exists()


def test_round_time_parts_hand_computed(tmp_path: Path) -> None:
    rows = [(1, "global", "round_seconds", 20.0), (1, "global", "aggregation_seconds", 1.0),
            (1, "a", "train_seconds", 5.0), (1, "b", "train_seconds", 9.0),
            (1, "a", "validate_seconds", 3.0),
            (2, "global", "round_seconds", 4.0), (2, "a", "train_seconds", 6.0)]
    run = summary.load_run(make_run(tmp_path / "t", rows))
    parts, total = plots.round_time_parts(run)
    np.testing.assert_allclose(parts["training"], [9.0, 6.0])  # the slowest client
    np.testing.assert_allclose(parts["validation"], [3.0, NAN])
    np.testing.assert_allclose(parts["aggregation"], [1.0, NAN])
    np.testing.assert_allclose(parts["waiting/overhead"], [7.0, 0.0])  # never negative
    np.testing.assert_allclose(total, [20.0, 4.0])


def test_round_time_parts_do_not_overlap_with_fedn_s_combiner_times(tmp_path: Path) -> None:
    """fedn's exec-training time contains the client training and the aggregation."""
    rows = [(1, "global", "round_seconds", 30.0),
            (1, "global", "round_exec_training_seconds", 20.0),
            (1, "global", "round_combination_seconds", 2.0),
            (1, "a", "train_seconds", 12.0), (1, "b", "train_seconds", 15.0),
            (1, "a", "validate_seconds", 4.0), (1, "b", "validate_seconds", 5.0)]
    run = summary.load_run(make_run(tmp_path / "t", rows))
    parts, total = plots.round_time_parts(run)
    assert set(parts) == {"training", "aggregation", "combiner other", "validation",
                          "waiting/overhead"}
    np.testing.assert_allclose(parts["combiner other"], [20.0 - 15.0 - 2.0])
    np.testing.assert_allclose(parts["waiting/overhead"], [30.0 - 20.0 - 5.0])
    # Stacked, the bars add up to the round's wall time.
    np.testing.assert_allclose(sum(parts.values()), total)


def test_figures_of_a_log_without_metrics(tmp_path: Path) -> None:
    run = summary.load_run(make_run(tmp_path / "bare", [(1, "global", "round_seconds", 3.0)]))
    for fig in (plots.plot_dice(run, 0.5), plots.plot_losses(run), plots.plot_epsilon(run),
                plots.plot_round_time(run), plots.plot_compare([run, run]),
                plots.plot_privacy_utility([run])):
        assert plots.png_bytes(fig).startswith(PNG_MAGIC)


def test_cli_analyze(tmp_path: Path, runs: list[Path]) -> None:
    out = tmp_path / "cli_report"
    result = fedseg_cli(["analyze", *map(str, runs), "--out", str(out),
                         "--target-dice", "0.5"])
    assert result.exit_code == 0, result.output
    assert "target: Dice 0.5" in result.output
    assert (out / "report.html").is_file() and (out / "summary.json").is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["--target-fraction", "0.5"], "exactly one pooled setting"),
    (["--target-dice", "0.5", "--target-fraction", "0.5"], "not both"),
])
def test_cli_errors_are_one_line(tmp_path: Path, runs: list[Path], args: list[str],
                                 message: str) -> None:
    result = fedseg_cli(["analyze", str(runs[0]), "--out",
                         str(tmp_path / "r"), *args])
    assert result.exit_code == 1
    assert message in result.output
    assert result.output.startswith("fedseg: error:") and result.output.count("\n") == 1


def test_cli_names_the_missing_log(tmp_path: Path) -> None:
    (tmp_path / "empty_run").mkdir()
    result = fedseg_cli(["analyze", str(tmp_path / "empty_run"), "--out",
                         str(tmp_path / "r")])
    assert result.exit_code == 1
    assert "empty_run" in result.output and "Traceback" not in result.output


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent "
                    "(apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path: Path, runs: list[Path]) -> None:
    (tmp_path / "aud").mkdir()
    files = report.write_report(runs, tmp_path / "report", target_fraction=0.5,
                                attacks=[_study(tmp_path / "study")],
                                audits=[_audit(tmp_path / "aud")])
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
         "--window-size=1200,2000", "--enable-logging=stderr", "--v=0",
         files.html.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The page has no script: any console message (INFO:CONSOLE / ERROR:CONSOLE) is a fault.
    console = [line for line in proc.stderr.splitlines()
               if ":CONSOLE" in line or "Uncaught" in line]
    assert console == []
    assert shot.read_bytes().startswith(PNG_MAGIC)
    assert shot.stat().st_size > 50_000  # a blank 1200x2000 page compresses to a few kB


def test_unwritable_report_folder_is_one_line_error(tmp_path: Path, runs: list[Path]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(FedsegError, match="cannot write the report"):
        report.write_report(runs[:1], blocker / "report")


# ------------------------------------------------ attack and audit sections (issue 6)

def _study(path: Path, old: bool = False) -> Path:
    """A two-row study.json in the schema run_study writes, plus one of its figures
    (old: as written before the threshold became relative to the prior)."""
    from fedseg.analysis.leakage import results as lr

    rows = []
    for sigma, corr, recognisable in ((0.0, 0.66, True), (0.543, -0.05, False)):
        row = {"batch_size": 1, "local_steps": 5, "noise_multiplier": sigma,
               "target_epsilon": None if sigma == 0 else 8.0, "correlation": corr,
               "psnr": 17.8, "ssim": 0.5, "mask_dice": 0.45, "recognisable": recognisable,
               "baseline": {"psnr": 16.0, "ssim": 0.183, "mask_dice": 0.142,
                            "correlation": 0.25},
               "settings": {"fresh_batches": True}, "seconds": 7.0}
        assert set(lr.STUDY_ROW_KEYS) <= set(row)
        rows.append(row)
    lr.write_json(path / lr.STUDY_NAME, {
        "rows": rows, "smallest_unrecognisable_sigma": 0.543, "fresh_batches": True,
        "threshold": ({"correlation": 0.2} if old else {"correlation_margin": 0.1})
        | {"mask_margin": 0.1},
        "sigma_for_epsilon": {"8.0": 0.543}})
    lr.write_png(path / "study_noise_multiplier.png",
                 lr.line_figure("q", "sigma", {"correlation": ([0, 0.5], [0.66, -0.05])}, "s"))
    return path


def _audit(path: Path) -> Path:
    """audit.json from the real row writer, the real bound and the real ROC metrics."""
    from fedseg.analysis.leakage import results as lr
    from fedseg.analysis.leakage.canary import audit_bound
    from fedseg.analysis.leakage.membership import roc_metrics

    included = np.array([True, False] * 16)
    rows = []
    for noise, scores in ((None, included.astype(float)), (1.0, np.arange(32.0))):
        canary = {"epsilon": math.inf if noise is None else 24.2,
                  "attack_auc": roc_metrics(scores, included)["auc"],
                  **audit_bound(scores, included, 1e-5, 0.95)}
        member = {a: roc_metrics(np.arange(8.0), np.arange(8) >= 4)
                  for a in lr.MEMBERSHIP_ATTACKS}
        rows.append(lr.audit_row(noise, canary, member if noise is None else None))
    lr.write_json(path / lr.AUDIT_NAME, {"rows": rows, "runs": []})
    return path


def test_report_shows_study_and_audit(tmp_path: Path, runs: list[Path]) -> None:
    study = _study(tmp_path / "study")
    (tmp_path / "aud").mkdir()
    audit = _audit(tmp_path / "aud") / "audit.json"
    files = report.write_report(runs[:1], tmp_path / "out", attacks=[study], audits=[audit])
    page = files.html.read_text()
    assert "Inversion study" in page and "Privacy audit" in page
    # the threshold and the smallest unrecognisable sigma, one row per grid point
    assert "&ge; prior + 0.10 or mask Dice &ge; prior + 0.10" in page
    assert "not recognisable: <b>0.543</b>" in page
    assert "<td>new per step</td>" in page and "<td>0.500 (0.183)</td>" in page
    assert "<td>0.660 (0.250)</td>" in page
    # all 16 guesses right (perfect scores): 1.230 at 95 %; accountant inf beside it
    assert "<td>inf</td><td>1.230 (95 %)</td><td>16/16</td><td>1.000</td>" in page
    # membership AUC 1 and TPR 1 at both FPRs for the first row, dashes for the second
    assert page.count("<td>1.000</td>") >= 6 and "<td>—</td><td>—</td>" in page
    copied = tmp_path / "out" / "leak1_study_noise_multiplier.png"
    assert copied in files.figures
    assert copied.read_bytes() == (study / "study_noise_multiplier.png").read_bytes()
    assert page.count("data:image/png;base64,") == len(files.figures)


def test_old_study_threshold_is_shown(tmp_path: Path, runs: list[Path]) -> None:
    files = report.write_report(runs[:1], tmp_path / "out",
                                attacks=[_study(tmp_path / "s", old=True)])
    assert "&ge; 0.20 or mask Dice &ge; prior + 0.10" in files.html.read_text()


def test_old_audit_without_row_confidence_is_read(tmp_path: Path, runs: list[Path]) -> None:
    from fedseg.analysis.leakage import results as lr

    path = _audit(tmp_path) / "audit.json"
    data = json.loads(path.read_text())
    for row in data["rows"]:
        del row["confidence"]
    data["runs"] = [{"canary_audit": {"confidence": 0.9}}] * 2
    path.write_text(json.dumps(data))
    assert [r["confidence"] for r in lr.load_leakage(path, "audit").data["rows"]] == [0.9] * 2


@pytest.mark.parametrize(("content", "kind", "message"), [
    (None, "audit", "no such file or folder"),
    ("{not json", "audit", "not JSON"),
    ('{"rows": []}', "audit", "non-empty list"),
    ('{"rows": [{"noise_multiplier": 1.0}]}', "audit", "lacks epsilon_accountant"),
    ('{"rows": [{"batch_size": 1}], "smallest_unrecognisable_sigma": null, '
     '"threshold": {"correlation_margin": 0.1, "mask_margin": 0.1}}', "attack",
     "lacks local_steps"),
    ('{"rows": [], "smallest_unrecognisable_sigma": null, "threshold": {"mask_margin": 0.1}}',
     "attack", "lacks correlation_margin"),
    ('{"note": "x"}', "attack", "lacks objective"),
    ("[1, 2]", "attack", "expected a JSON object"),
])
def test_bad_leakage_json_is_one_line_error(tmp_path: Path, runs: list[Path], content: str,
                                            kind: str, message: str) -> None:
    path = tmp_path / ("audit.json" if kind == "audit" else "study.json")
    if content is not None:
        path.write_text(content)
    out = tmp_path / "out"
    args = {"audits": [path]} if kind == "audit" else {"attacks": [path]}
    with pytest.raises(FedsegError, match=message) as info:
        report.write_report(runs[:1], out, **args)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not out.exists()


def test_cli_analyze_with_sections_and_bad_folder(tmp_path: Path, runs: list[Path]) -> None:
    study = _study(tmp_path / "study")
    (tmp_path / "aud").mkdir()
    _audit(tmp_path / "aud")
    out = tmp_path / "cli"
    ok = fedseg_cli(["analyze", str(runs[0]), "--out", str(out), "--attack",
                     str(study), "--audit", str(tmp_path / "aud")])
    assert ok.exit_code == 0, ok.output
    assert "privacy sections: 1 attack, 1 audit" in ok.output
    assert "Privacy audit" in (out / "report.html").read_text()
    bad = fedseg_cli(["analyze", str(runs[0]), "--out", str(tmp_path / "r2"),
                      "--audit", str(tmp_path / "study")])
    assert bad.exit_code == 1 and bad.output.count("\n") == 1
    assert "no audit.json in this folder" in bad.output and not (tmp_path / "r2").exists()


@pytest.mark.slow
def test_real_study_and_audit_in_the_report(tmp_path: Path, runs: list[Path]) -> None:
    """The real writers (fedseg attack study / invert / audit, tiny settings) feed the
    report, so reader and writers cannot drift apart."""
    result = fedseg_cli(["attack", "study", "--out", str(tmp_path / "study"),
                         "--batch-sizes", "1", "--local-steps", "2", "--epsilons", "8",
                         "--sigmas", "", "--iterations", "2", "--levels", "1",
                         "--base-filters", "4", "--groups", "4"])
    assert result.exit_code == 0, result.output
    result = fedseg_cli(["attack", "invert", "--simulate", "--out", str(tmp_path / "inv"),
                         "--iterations", "2", "--levels", "1", "--base-filters", "4",
                         "--groups", "4"])
    assert result.exit_code == 0, result.output
    result = fedseg_cli(["audit", "--out", str(tmp_path / "audit"), "--noise", "none,1.0",
                         "--canaries", "4", "--steps", "2", "--batch", "2",
                         "--no-membership"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "report"
    result = fedseg_cli(["analyze", str(runs[0]), "--out", str(out), "--attack",
                         str(tmp_path / "study"), "--attack", str(tmp_path / "inv"),
                         "--audit", str(tmp_path / "audit" / "audit.json")])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()
    study = json.loads((tmp_path / "study" / "study.json").read_text())
    # sigma 0 and the epsilon-8 sigma at batch 1 / 1 step, plus the 2-step point
    assert page.count("<td>new per step</td>") == len(study["rows"]) == 3
    assert "Update inversion" in page and "patches reconstructed" in page
    assert "(95 %)" in page and "<td>none</td><td>inf</td>" in page
    names = {p.name for p in out.glob("leak*.png")}
    assert {"leak1_study_batch_size.png", "leak2_montage.png", "leak3_audit.png"} <= names


def _sweep_run(root: Path, technique: str, eps: float, seed: int, dice: float) -> Path:
    """A finished sweep run of 2 clients whose config carries the sweep section."""
    token = "epsinf" if math.isinf(eps) else f"eps{eps:g}"
    name = f"{technique}-{token}-s{seed}"
    rows = []
    for client, off in (("c1", -0.01), ("c2", 0.01)):
        rows += [(1, client, "val_dice_mean", dice + off), (1, client, "n_val", 2.0),
                 (1, client, "val_dice_heart", dice + 2 * off)]
        if math.isfinite(eps):
            rows.append((1, client, "epsilon", eps))
    rows.append((1, "global", "round_seconds", 5.0))
    target = None if math.isinf(eps) else eps
    config = {"seed": seed, "clinic": {"privacy": {"enabled": target is not None}},
              "sweep": {"sweep": "s", "point": name, "target_epsilon": target,
                        "params": {"variant": technique, "target_epsilon": eps,
                                   "seed": seed}}}
    return make_run(root / name, rows, seed=seed, config=config)


def test_privacy_utility_curve_from_a_sweep(tmp_path: Path) -> None:
    runs = []
    for seed, jitter in ((1, -0.02), (2, 0.0), (3, 0.02)):
        for eps, dice in ((1.0, 0.5), (8.0, 0.7), (math.inf, 0.8)):
            runs.append(_sweep_run(tmp_path, "recipe", eps, seed, dice + jitter))
    runs.append(_sweep_run(tmp_path, "k4", 8.0, 1, 0.75))
    runs.append(_sweep_run(tmp_path, "fedavg-seed", math.inf, 1, 0.85))
    loaded = [summary.load_run(r) for r in runs]
    assert summary.technique_label(loaded[0]) == "recipe"
    data = summary.summarize_runs(loaded)
    lines = {line["label"]: line for line in data["privacy_utility"]}
    assert set(lines) == {"recipe", "k4", "fedavg-seed"}
    recipe = lines["recipe"]["points"]
    assert [p["epsilon"] for p in recipe] == [1.0, 8.0, None]
    at8 = recipe[1]
    assert at8["dice_mean"]["n"] == 3 and at8["seeds"] == [1, 2, 3]
    assert at8["dice_mean"]["mean"] == pytest.approx(0.7)
    assert at8["dice_mean"]["std"] == pytest.approx(0.02)  # sample sd of -0.02, 0, 0.02
    assert at8["organs"]["heart"]["mean"] == pytest.approx(0.7)
    assert lines["k4"]["points"][0]["dice_mean"]["std"] is None  # one seed: no spread
    # Seed replicates group even though each point's name carries its seed.
    assert {g["label"] for g in data["groups"]} >= {"recipe-eps8", "recipe-eps1"}
    # The report: the curve figure and the table with mean ± sd per technique.
    out = tmp_path / "report"
    files = report.write_report(runs, out)
    assert (out / "privacy_utility.png").read_bytes().startswith(PNG_MAGIC)
    page = files.html.read_text()
    assert "Privacy-utility" in page
    assert "0.700 ± 0.020 (n=3)" in page
    assert "0.850 (n=1)" in page
    # The figure: one error-bar line per technique with points, the no-DP-only line dashed.
    fig = plots.plot_privacy_utility(loaded)
    ax = fig.axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert "recipe" in labels and "k4" in labels
    assert any(lbl.startswith("fedavg-seed 0.850") for lbl in labels)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "8", "no DP"]
