"""``rootflow synth``: write a synthetic minirhizotron archive (registered by :mod:`rootflow.cli`)."""

from __future__ import annotations

import typer


def _parse_storage_options(items: list[str]) -> dict[str, object] | None:
    """``key=value`` strings -> a StorageOptions mapping (``None`` = read the environment)."""
    if not items:
        return None
    from rootflow.io._cli import refuse_credential_options

    refuse_credential_options(items)  # credentials come from the environment, never from here
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not key=value", param_hint="--storage-option")
        low = value.lower()
        out[key.strip()] = (low in ("1", "true", "yes")) if low in (
            "1", "0", "true", "false", "yes", "no") else value
    return out


def register(app: typer.Typer) -> None:
    """Add ``rootflow synth`` to the top-level app."""

    @app.command("synth")
    def synth(
        out_uri: str = typer.Argument(..., help="Folder or prefix to write (path or s3://...)."),
        preset: str | None = typer.Option(None, help="Size preset: tiny, small (640x560 @150 "
                                          "dpi, the default), ci600 (2550x2273 @300 dpi), "
                                          "bartz (640x480 @903 dpi)."),
        look: str | None = typer.Option(None, help="Soil/camera look: loam (default), sand, clay."),
        seed: int | None = typer.Option(None, help="Root seed (same seed -> identical archive)."),
        years: int | None = typer.Option(None, help="Seasons [1]."),
        tubes: int | None = typer.Option(None, help="Tubes per season [2]."),
        windows: int | None = typer.Option(None, help="Windows (frames) per tube [3]."),
        sessions: int | None = typer.Option(None, help="Sessions per season [3]; roots grow "
                                            "between them."),
        n_images: int | None = typer.Option(None, "--n-images", help="Cap on the image count."),
        empty_fraction: float | None = typer.Option(None, help="Probability that a window has "
                                                    "no roots [0.15]."),
        experiment: str | None = typer.Option(None, help="Experiment name in file names [SYNTH]."),
        set_: list[str] = typer.Option([], "--set", help="Any SynthConfig field as key=value "
                                       "(repeatable), e.g. --set roots_per_dm2=5."),
        config_yaml: str | None = typer.Option(None, "--config", help="SynthConfig YAML file."),
        workers: int = typer.Option(1, help="Rendering processes."),
        storage_option: list[str] = typer.Option(
            [], "--storage-option", "-s",
            help="Storage option key=value (endpoint_url, region, allow_http, path_style); "
                 "repeatable. Credentials come from the AWS_* environment."),
    ) -> None:
        """Write a synthetic minirhizotron archive with exact ground truth."""
        import time

        from rootflow import config as config_io
        from rootflow.io.storage import StorageOptions
        from rootflow.synth.archive import generate_archive
        from rootflow.synth.config import PRESETS, SynthConfig

        if preset is not None and preset not in PRESETS:
            raise typer.BadParameter(f"unknown preset {preset!r}; valid: {sorted(PRESETS)}",
                                     param_hint="--preset")
        try:
            base = config_io.load(SynthConfig, config_yaml) if config_yaml else SynthConfig()
            flags = {"look": look, "seed": seed, "n_years": years, "n_tubes": tubes,
                     "n_windows": windows, "n_sessions": sessions, "n_images": n_images,
                     "empty_fraction": empty_fraction, "experiment": experiment}
            fields = {**config_io.to_dict(base), **(PRESETS[preset] if preset else {}),
                      **{k: v for k, v in flags.items() if v is not None}}
            cfg = config_io.override(config_io.from_dict(SynthConfig, fields), set_)
            opts = StorageOptions.from_mapping(_parse_storage_options(storage_option))
        except ValueError as e:
            raise typer.BadParameter(str(e)) from e
        t0 = time.perf_counter()
        arch = generate_archive(out_uri, config=cfg, storage_options=opts, workers=workers)
        secs = time.perf_counter() - t0
        gt = arch.ground_truth
        length = sum(gt.column("length_mm").to_pylist())
        typer.echo(
            f"wrote {arch.n_images} images + masks ({arch.n_empty} without roots, "
            f"{length / 1000:.2f} m of root) to {arch.uri} in {secs:.1f} s "
            f"({secs / max(arch.n_images, 1):.2f} s/image; {cfg.width}x{cfg.height} px @ "
            f"{cfg.dpi:g} dpi, look={cfg.look})")
        typer.echo(f"ground truth: {arch.ground_truth_uri}; roots: {arch.roots_uri}; "
                   f"experiment: {arch.experiment_yaml_uri}")
