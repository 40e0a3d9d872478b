"""``fedseg attack invert|study``: reconstruct client data from model updates.

``invert`` attacks one update: either a stored round (``--global-weights`` and
``--client-weights`` npz files plus the client's training settings) or a freshly
simulated client (``--simulate``: tiny model, phantom patients). ``study`` measures
reconstruction quality vs batch size, local steps and DP noise. Both write JSON, PNG and
an HTML page under ``--out``. The client draws a new batch at every local step, as
ClinicApp does (local steps x batch patches to reconstruct); ``--same-batch`` assumes one
batch for every step instead (the attacker's best case).
"""

from __future__ import annotations

from pathlib import Path

import click

from fedseg_clinic.errors import FedsegError


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise FedsegError(f"{name}={text!r}: expected comma-separated integers") from None
    if not values or any(v < 1 for v in values):
        raise FedsegError(f"{name}={text!r}: expected integers >= 1")
    return values


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise FedsegError(f"{name}={text!r}: expected comma-separated numbers") from None
    if any(not v > 0 for v in values):
        raise FedsegError(f"{name}={text!r}: expected numbers > 0")
    return values


_model_options = [
    click.option("--levels", type=int, default=2, show_default=True, help="U-Net levels."),
    click.option("--base-filters", type=int, default=8, show_default=True,
                 help="U-Net channels at the first level."),
    click.option("--groups", type=int, default=8, show_default=True,
                 help="U-Net GroupNormalization groups (as in the attacked run's model)."),
    click.option("--iterations", type=int, default=150, show_default=True,
                 help="Attack optimisation steps."),
    click.option("--tv-weight", type=float, default=1e-2, show_default=True,
                 help="Total-variation prior weight."),
    click.option("--lr", "learning_rate", type=float, default=0.1, show_default=True,
                 help="Client learning rate."),
    click.option("--clip", "l2_norm_clip", type=float, default=1.0, show_default=True,
                 help="Client per-example clip norm (0 = non-DP client, no clipping)."),
    click.option("--seed", type=int, default=0, show_default=True),
    click.option("--same-batch", is_flag=True,
                 help="Assume the client reuses one batch at every local step (the "
                      "attacker's best case); default: a new batch per step, as ClinicApp."),
    click.option("--out", type=click.Path(path_type=Path), required=True,
                 help="Output folder (results.json, montage.png, report.html)."),
]


def _with_model_options(func: click.decorators.FC) -> click.decorators.FC:
    for option in reversed(_model_options):
        func = option(func)
    return func


@click.group()
def attack() -> None:
    """Privacy attacks on our own client updates (honest-but-curious server)."""


@attack.command()
@_with_model_options
@click.option("--simulate", is_flag=True, help="Attack a freshly simulated phantom client.")
@click.option("--global-weights", type=click.Path(path_type=Path), default=None,
              help="npz the client received (stored round).")
@click.option("--client-weights", type=click.Path(path_type=Path), default=None,
              help="npz the client sent back (stored round).")
@click.option("--batch", "batch_size", type=int, default=1, show_default=True,
              help="Client batch size (patches per step).")
@click.option("--local-steps", type=int, default=1, show_default=True)
@click.option("--patch", type=int, default=8, show_default=True, help="Cubic patch side.")
@click.option("--noise", "noise_multiplier", type=float, default=0.0, show_default=True,
              help="DP noise multiplier of the simulated client.")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd",
              show_default=True)
@click.option("--secure-aggregation", is_flag=True,
              help="With --simulate: attack what the server stores under secure "
                   "aggregation (the masked update), same batch, steps and noise.")
def invert(levels: int, base_filters: int, groups: int, iterations: int, tv_weight: float,
           learning_rate: float, l2_norm_clip: float, seed: int, same_batch: bool, out: Path,
           simulate: bool,
           global_weights: Path | None, client_weights: Path | None, batch_size: int,
           local_steps: int, patch: int, noise_multiplier: float, optimizer: str,
           secure_aggregation: bool) -> None:
    """Reconstruct a client's CT patches and masks from one update."""
    from fedseg.analysis.leakage import inversion as inv
    from fedseg.analysis.leakage import reports
    from fedseg_clinic.model.unet import UNetConfig

    stored = global_weights is not None or client_weights is not None
    if simulate == stored or (stored and (global_weights is None or client_weights is None)):
        raise FedsegError("give either --simulate or both --global-weights and "
                          "--client-weights")
    if secure_aggregation and not simulate:
        raise FedsegError("--secure-aggregation needs --simulate (a stored round under "
                          "secure aggregation has no single update to give)")
    config = UNetConfig(levels=levels, base_filters=base_filters, groups=groups)
    settings = inv.ClientSettings(learning_rate, local_steps, batch_size, (patch,) * 3,
                                  l2_norm_clip or None, optimizer,
                                  fresh_batches=not same_batch)
    attack_config = inv.AttackConfig(iterations=iterations, tv_weight=tv_weight, seed=seed)
    if simulate:
        result, client, rec = inv.attack_simulated(config, settings, noise_multiplier,
                                                   attack_config, seed, secure_aggregation)
        files = reports.write_inversion(out, result, rec.images, rec.labels,
                                        client.images, client.labels)
        prior = result["baseline"]
        click.echo(f"PSNR {result['psnr']:.2f} dB (prior {prior['psnr']:.2f}), "
                   f"SSIM {result['ssim']:.3f} (prior {prior['ssim']:.3f}), "
                   f"correlation {result['correlation']:.3f} (prior "
                   f"{prior['correlation']:.3f}), mask Dice "
                   f"{result['mask_dice']:.3f} (prior {prior['mask_dice']:.3f})"
                   f", recognisable: {result['recognisable']}")
    else:
        assert global_weights is not None and client_weights is not None
        result, rec = inv.attack_stored(config, settings, global_weights, client_weights,
                                        attack_config)
        files = reports.write_inversion(out, result, rec.images, rec.labels)
    click.echo(f"wrote {files.summary}, {files.figures[0]}, {files.html}")


@attack.command()
@_with_model_options
@click.option("--patch", type=int, default=8, show_default=True, help="Cubic patch side.")
@click.option("--batch-sizes", default="1,2,4,8", show_default=True,
              help="Batch sizes (1 local step, no noise).")
@click.option("--local-steps", "local_steps_text", default="1,5,20", show_default=True,
              help="Local steps (batch 1, no noise; a new batch per step unless "
                   "--same-batch).")
@click.option("--epsilons", default="8,4,1", show_default=True,
              help="Target epsilons whose calibrated sigma is tried (batch 1, 1 step).")
@click.option("--sigmas", default="0.001,0.01,0.1", show_default=True,
              help="Further noise multipliers tried (batch 1, 1 step); '' for none.")
def study(levels: int, base_filters: int, groups: int, iterations: int, tv_weight: float,
          learning_rate: float, l2_norm_clip: float, seed: int, same_batch: bool, out: Path,
          patch: int,
          batch_sizes: str, local_steps_text: str, epsilons: str, sigmas: str) -> None:
    """Reconstruction quality vs batch size, local steps and DP noise."""
    from fedseg.analysis.leakage import inversion as inv
    from fedseg.analysis.leakage import reports
    from fedseg_clinic.model.unet import UNetConfig

    if not l2_norm_clip > 0:
        raise FedsegError("study: --clip must be > 0 (the noise is relative to it)")
    grid = inv.StudyGrid(batch_sizes=_ints(batch_sizes, "--batch-sizes"),
                         local_steps=_ints(local_steps_text, "--local-steps"),
                         epsilons=_floats(epsilons, "--epsilons"),
                         sigmas=_floats(sigmas, "--sigmas"))
    result = inv.run_study(UNetConfig(levels=levels, base_filters=base_filters, groups=groups),
                           grid,
                           inv.AttackConfig(iterations=iterations, tv_weight=tv_weight,
                                            seed=seed),
                           patch, learning_rate, l2_norm_clip, seed,
                           fresh_batches=not same_batch)
    files = reports.write_study(out, result)
    for row in reports.study_rows(result):
        click.echo(reports.format_row(row))
    click.echo(f"smallest unrecognisable sigma: {result['smallest_unrecognisable_sigma']}")
    click.echo(f"wrote {files.summary}, {files.html}")


COMMANDS: list[click.Command] = [attack]
