"""``fedseg predict``: segment patients with a trained model; ``fedseg model export``."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("predict")
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="An exported model folder (fedseg model export) or a round's weights "
                   "(runs/<name>/models/round-<k>.npz).")
@click.option("--ct", "ct_path", required=True, type=click.Path(path_type=Path),
              help="A DICOM CT series folder, a NIfTI/NRRD CT file, or a folder of patients.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Output folder (one sub-folder per patient when CT holds several).")
@click.option("--format", "fmt", type=click.Choice(["rtstruct", "seg", "nifti"]),
              default="rtstruct", show_default=True,
              help="DICOM RTSTRUCT, DICOM SEG (both on the source series) or a NIfTI label "
                   "map with labels.json.")
def predict(model_path: Path, ct_path: Path, out: Path, fmt: str) -> None:
    """Segment the CT of one or many patients and write contours for planning."""
    from fedseg_clinic.prediction import predict_path

    results = predict_path(model_path, ct_path, out, fmt, progress=click.echo)
    click.echo(f"segmented {len(results)} patient(s) into {out}")


@click.group("model")
def model() -> None:
    """Trained models: export with a model card."""


@model.command("export")
@click.argument("run_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--round", "round_k", required=True, type=click.IntRange(min=1),
              help="Which round's global model.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Folder to write model.keras and model_card.json into (new or empty).")
def export(run_dir: Path, round_k: int, out: Path) -> None:
    """Export round K's global model of RUN_DIR as a self-contained model."""
    from fedseg.orchestration.export import export_model

    folder = export_model(run_dir, round_k, out)
    click.echo(f"exported round {round_k} of {run_dir} to {folder}")


COMMANDS: list[click.Command] = [predict, model]
