"""``fedseg seed pretrain|show``: the initial global model, pretrained on public data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from fedseg_clinic.errors import FedsegError


def _json_object(option: str, text: str | None, what: str) -> dict[str, object] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FedsegError(f"{option} {text!r}: not JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise FedsegError(f"{option} {text!r}: must be a JSON object of {what} fields")
    return value


@click.group("seed")
def seed_group() -> None:
    """The initial global model: pretrain it (no DP) on public data, inspect it."""


@seed_group.command("pretrain")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--demo", is_flag=True,
              help="The demo's two-stage recipe (rebuilds seed/pretrained/demo-seed.npz).")
@click.option("--model", "model_json", default=None,
              help='UNetConfig as JSON, e.g. \'{"levels": 3, "base_filters": 8}\'.')
@click.option("--cases", "cases_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Public cases folder (train/val) instead of phantoms.")
@click.option("--preset", "phantom_preset", type=click.Choice(["iid", "non-iid"]),
              default=None, help="Public phantom preset (non-iid: 3 scanner types pooled).")
@click.option("--init", "init_weights", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Continue from this pretrained seed (with its sidecar).")
@click.option("--phantom-seed", type=int, default=None,
              help="Seed of the public phantoms (keep it apart from the clinics').")
@click.option("--patients", type=int, default=None, help="Public phantom patients.")
@click.option("--size", type=int, default=None, help="Phantom matrix size.")
@click.option("--steps", type=int, default=None, help="Optimiser steps.")
@click.option("--batch", "batch_size", type=int, default=None, help="Patients per step.")
@click.option("--patch", type=int, default=None, help="Cubic training patch side.")
@click.option("--lr", "learning_rate", type=float, default=None, help="Adam learning rate.")
@click.option("--training", "training_json", default=None,
              help='More clinic training settings as JSON, e.g. \'{"dice_classes": '
                   '"present", "foreground_fraction": 0.9}\'.')
@click.option("--val-overlap", type=float, default=None,
              help="Tile overlap of the seed's own validation (default 0.25).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the generated public phantoms here (default: temporary).")
def pretrain(out: Path, demo: bool, model_json: str | None, cases_dir: Path | None,
             phantom_preset: str | None, init_weights: Path | None,
             phantom_seed: int | None, patients: int | None, size: int | None,
             steps: int | None, batch_size: int | None, patch: int | None,
             learning_rate: float | None, training_json: str | None,
             val_overlap: float | None, work_dir: Path | None) -> None:
    """Pretrain a seed without DP on public data; write OUT and OUT's .json sidecar."""
    from fedseg.seed.pretrain import PretrainSpec, pretrain_demo_seed, pretrain_seed

    model = _json_object("--model", model_json, "UNetConfig")
    training = _json_object("--training", training_json, "TrainingSettings")
    if not demo and model is None:
        raise FedsegError("give --model (the clinics' UNetConfig) or --demo")
    changes = {k: v for k, v in {
        "model": model, "cases_dir": cases_dir, "phantom_seed": phantom_seed,
        "phantom_preset": phantom_preset, "init_weights": init_weights,
        "patients": patients, "size": size, "steps": steps, "batch_size": batch_size,
        "patch_size": (patch, patch, patch) if patch else None,
        "learning_rate": learning_rate, "training": training,
        "val_overlap": val_overlap}.items() if v is not None}
    if demo:
        if changes:
            raise FedsegError(f"--demo is the fixed recipe; drop --{sorted(changes)[0]}")
        side = pretrain_demo_seed(out.resolve(), work_dir=work_dir, progress=click.echo)
    else:
        spec = dataclasses.replace(PretrainSpec(model=model or {}), **changes)
        side = pretrain_seed(spec, out.resolve(), work_dir=work_dir, progress=click.echo)
    click.echo(f"seed {out} (sidecar {out.with_suffix('.json')}): Dice "
               f"{side['dice_mean']:.3f}, {side['steps']} steps, {side['train_seconds']} s")


@seed_group.command("show")
@click.argument("seed_file", type=click.Path(dir_okay=False, path_type=Path))
def show(seed_file: Path) -> None:
    """Print what a pretrained seed was trained on (its checked sidecar) as JSON."""
    from fedseg.seed.pretrain import read_seed_info

    click.echo(json.dumps(read_seed_info(seed_file), indent=2))


COMMANDS: list[click.Command] = [seed_group]
