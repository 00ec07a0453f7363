"""``rootflow manifest build|parse|validate`` (registered by :mod:`rootflow.cli`)."""

from __future__ import annotations

import json
from typing import Any

import typer

manifest_app = typer.Typer(help="Build, parse and validate image manifests.",
                           no_args_is_help=True)

_STORAGE_HELP = ("Object-storage setting key=value (endpoint_url, region, allow_http, "
                 "path_style); repeatable; defaults come from AWS_* variables. Credentials are "
                 "never taken here: they come from the environment or the provider chain.")

#: ``--storage-option`` keys that are credentials (any spelling of them): refused, because a
#: command line is visible to every user of the machine (``ps``) and is stored as a RayJob's or
#: a submitted job's entry point.
CREDENTIAL_OPTIONS = frozenset({"key", "secret", "token", "password", "aws_access_key_id",
                                "aws_secret_access_key", "aws_session_token", "access_key",
                                "secret_key", "session_token"})


def cli_error(what: str | BaseException, code: int = 2) -> typer.Exit:
    """Print ``error: <first line>`` on stderr and return the Exit to raise (no traceback)."""
    text = str(what).strip()
    if not text and isinstance(what, BaseException):
        text = type(what).__name__
    typer.echo(f"error: {text.splitlines()[0] if text else 'failed'}", err=True)
    return typer.Exit(code)


def log_progress_to_stderr() -> None:
    """INFO logs with timestamps on stderr for long commands (train, studio), unless the
    caller already set up logging; stdout stays for the command's one result."""
    import logging
    import sys

    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def refuse_credential_options(items: list[str] | None) -> None:
    """Exit 2 with one line if any ``--storage-option`` item is a credential (its value is
    never printed); every command's ``--storage-option`` goes through here."""
    for item in items or []:
        k = item.split("=", 1)[0]
        if "=" in item and k.strip().lower() in CREDENTIAL_OPTIONS:
            raise cli_error(
                f"--storage-option {k}=... refused: credentials on a command line are visible "
                "in `ps` and stored in job entry points; set AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN in the environment, or use the "
                "provider chain (instance profile, web identity)")


def storage_from_cli(items: list[str] | None) -> dict[str, Any]:
    """``--storage-option key=value`` pairs on top of the environment (``AWS_*``).

    Credentials (``key=``, ``secret=``, ``token=``...) are refused with one line and exit 2:
    they would be readable in ``ps`` and stored in job entry points. They come from the
    standard provider chain instead (``AWS_*`` variables, instance profile, web identity).
    """
    from rootflow.io.storage import StorageOptions

    refuse_credential_options(items)
    base = StorageOptions.from_env().to_dict()
    for item in items or []:
        if "=" not in item:
            # Not echoed: a value pasted without its key may be a secret.
            raise cli_error("--storage-option takes key=value (got a value without '=')")
        k, v = item.split("=", 1)
        base[k] = v.lower() in ("1", "true", "yes") if k in ("allow_http", "path_style") else v
    try:
        return StorageOptions.from_mapping(base).to_dict()
    except ValueError as e:
        raise cli_error(f"--storage-option: {e}") from None


@manifest_app.command("build")
def build(
    src_uri: str = typer.Argument(..., help="Folder (local or s3://...) holding the images."),
    out: str = typer.Option(..., "--out", "-o", help="Manifest to write (.parquet or .csv)."),
    experiment_config: str | None = typer.Option(
        None, "--experiment-config", "-e",
        help="Per-experiment YAML (dpi, tube geometry, date_order); default SRC/experiment.yaml."),
    rejects: str | None = typer.Option(
        None, "--rejects", help="Where to write rejected files (Parquet); default "
        "<out stem>.rejects.parquet when there are any."),
    date_order: str | None = typer.Option(
        None, "--date-order", help="DMY, YMD or MDY for 2-digit-year dates (overrides the YAML)."),
    pattern: str | None = typer.Option(
        None, "--pattern", help="Regex with named groups replacing the ICAP file-name pattern."),
    id_from: str = typer.Option("uri", "--id-from", help="image_id from: uri, content or name."),
    storage_option: list[str] = typer.Option(None, "--storage-option", "-s", help=_STORAGE_HELP),
) -> None:
    """List images under SRC_URI, parse their names and write a validated manifest."""
    from rootflow.io.manifest import ManifestError, build_manifest, write_manifest, write_table

    so = storage_from_cli(storage_option)
    if date_order is not None and date_order not in ("DMY", "YMD", "MDY"):
        raise cli_error("--date-order must be DMY, YMD or MDY")
    if id_from not in ("uri", "content", "name"):
        raise cli_error("--id-from must be uri, content or name")
    try:
        result = build_manifest(src_uri, experiment_config=experiment_config,
                                storage_options=so, date_order=date_order,  # type: ignore[arg-type]
                                filename_pattern=pattern, id_from=id_from)  # type: ignore[arg-type]
    except (ManifestError, OSError) as e:
        raise cli_error(e) from None
    write_manifest(result.table, out, storage_options=so)
    typer.echo(f"manifest: {result.table.num_rows} images -> {out}")
    n_rej = result.rejects.num_rows
    if n_rej or rejects:
        rej_uri = rejects or (out.rsplit(".", 1)[0] + ".rejects.parquet")
        write_table(result.rejects, rej_uri, storage_options=so)
        typer.echo(f"rejected: {n_rej} files -> {rej_uri}")
        reasons: dict[str, int] = {}
        for r in result.rejects.column("reason").to_pylist():
            short = r.split(":", 1)[0] if r.startswith("filename:") else r
            reasons[short] = reasons.get(short, 0) + 1
        for reason, n in sorted(reasons.items(), key=lambda x: -x[1]):
            typer.echo(f"  {n} x {reason}")
    else:
        typer.echo("rejected: 0 files")


@manifest_app.command("parse")
def parse(
    names: list[str] = typer.Argument(..., help="File names (or paths) to parse."),
    date_order: str | None = typer.Option(None, "--date-order", help="DMY, YMD or MDY."),
    pattern: str | None = typer.Option(None, "--pattern", help="Regex with named groups."),
) -> None:
    """Print the fields parsed from each name as one JSON object per line (exit 1 if any fail)."""
    from rootflow.io.filenames import FilenameError, parse_name

    failed = 0
    for name in names:
        try:
            out = {"name": name, **parse_name(name, date_order=date_order,  # type: ignore[arg-type]
                                              pattern=pattern).to_json_dict()}
        except FilenameError as e:
            failed += 1
            out = {"name": name, "error": str(e)}
        typer.echo(json.dumps(out))
    if failed:
        raise typer.Exit(1)


@manifest_app.command("validate")
def validate(
    uri: str = typer.Argument(..., help="Manifest (Parquet or CSV) to check."),
    experiment_config: str | None = typer.Option(None, "--experiment-config", "-e"),
    out: str | None = typer.Option(None, "--out", "-o",
                                   help="Write the completed, validated manifest here."),
    storage_option: list[str] = typer.Option(None, "--storage-option", "-s", help=_STORAGE_HELP),
) -> None:
    """Validate a user-supplied manifest against the schema (errors name column and row)."""
    from rootflow.io.manifest import ManifestError, read_manifest, write_manifest

    so = storage_from_cli(storage_option)
    try:
        table = read_manifest(uri, storage_options=so, experiment_config=experiment_config)
    except (ManifestError, OSError) as e:
        typer.echo(f"invalid: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}",
                   err=True)
        raise typer.Exit(2) from None
    except Exception as e:  # storage client errors (no endpoint, refused credentials)
        raise cli_error(f"cannot read {uri}: {type(e).__name__}: {e}") from None
    typer.echo(f"valid: {table.num_rows} rows")
    if out:
        write_manifest(table, out, storage_options=so)
        typer.echo(f"written: {out}")


def register(app: typer.Typer) -> None:
    """Add ``rootflow manifest ...`` to the top-level app."""
    app.add_typer(manifest_app, name="manifest")
