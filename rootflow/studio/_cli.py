"""``rootflow studio``: serve the correction studio (see docs/studio.md)."""

from __future__ import annotations

import ipaddress

import typer

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host(host: str, *, allow_remote: bool, token: str | None) -> None:
    """Refuse a non-loopback bind unless ``--allow-remote`` and ``--token`` are both given."""
    if is_loopback(host):
        return
    if not allow_remote:
        raise ValueError(f"--host {host} is not loopback: the studio writes to your lake, so "
                         "it refuses other hosts unless --allow-remote and --token are given")
    if not token or len(token) < 16:
        raise ValueError("--allow-remote needs --token T (at least 16 characters), which "
                         "every request must then carry")


def register(app: typer.Typer) -> None:
    @app.command("studio")
    def studio(
        lake: str = typer.Option(..., help="Lake root URI: images and proposals come from its traits table; annotations are written there."),
        manifest: str | None = typer.Option(None, help="Manifest URI (CSV/Parquet): the queue's images (with the lake's proposals added)."),
        forest_model: str | None = typer.Option(None, help="forest.json whose masks are offered as a proposal until the studio's forest has retrained on your scribbles."),
        rootsam_config: str | None = typer.Option(None, help="RootSAM variant for clicks (test, hiera_tiny, ...); none = forest clicks only."),
        base_checkpoint: str | None = typer.Option(None, help="SAM2.1 base weights URI for --rootsam-config (none = random init: masks are meaningless)."),
        rootsam_checkpoint: str | None = typer.Option(None, help="RootSAM checkpoint URI (fine-tuned decoder)."),
        person: str | None = typer.Option(None, help="Default person name recorded with each annotation."),
        host: str = typer.Option("127.0.0.1", help="Address to bind (loopback unless --allow-remote)."),
        port: int = typer.Option(8765, help="Port."),
        allow_remote: bool = typer.Option(False, "--allow-remote", help="Allow a non-loopback --host (needs --token)."),
        token: str | None = typer.Option(None, envvar="ROOTFLOW_STUDIO_TOKEN", help="Token every request must carry (header X-Studio-Token or ?token=)."),
        prefetch: int = typer.Option(2, help="Next queue images encoded in the background (RootSAM)."),
        torch_threads: int = typer.Option(1, help="torch intra-op threads. 1 (default) keeps a click's decoder pass at tens of ms while the background encoder runs: with 2 threads on 2 busy cores the two fight and a click took ~1 s (docs/studio.md)."),
        storage_option: list[str] = typer.Option([], "--storage-option", help="key=value: endpoint_url, region, allow_http, path_style (credentials from AWS_* env)."),
    ) -> None:
        """Serve the correction studio: fix masks with a few clicks, write annotations."""

        from rootflow.io._cli import cli_error as fail
        from rootflow.io._cli import storage_from_cli

        try:
            check_host(host, allow_remote=allow_remote, token=token)
        except ValueError as e:
            raise fail(e) from None
        if not 1 <= port <= 65535:
            raise fail(f"--port must be 1..65535, got {port}")
        if (base_checkpoint or rootsam_checkpoint) and not rootsam_config:
            raise fail("--base-checkpoint/--rootsam-checkpoint need --rootsam-config")
        if torch_threads < 1:
            raise fail(f"--torch-threads must be >= 1, got {torch_threads}")
        from rootflow.io._cli import log_progress_to_stderr

        log_progress_to_stderr()
        import uvicorn

        from rootflow.studio.app import create_app
        from rootflow.studio.session import StudioConfig, build_studio

        so = storage_from_cli(storage_option) or None
        forest_base = None
        predictor = None
        try:
            if forest_model:
                from rootflow.models.segmenters import load_segmenter

                forest_base = load_segmenter(forest_model, kind="forest", storage_options=so)
            if rootsam_config:
                import torch

                from rootflow.inference.rootsam import RootSAMInferenceConfig, RootSAMPredictor

                torch.set_num_threads(torch_threads)

                predictor = RootSAMPredictor(RootSAMInferenceConfig(
                    variant=rootsam_config, base_checkpoint=base_checkpoint,
                    rootsam_checkpoint=rootsam_checkpoint, device="cpu",
                    embedding_cache_tiles=512), storage_options=so)
            st = build_studio(StudioConfig(lake_uri=lake, manifest_uri=manifest, person=person,
                                           prefetch_ahead=prefetch),
                              storage_options=so, rootsam=predictor, forest_base=forest_base)
        except (ValueError, OSError, KeyError) as e:
            raise fail(e) from None
        if not st.entries:
            raise fail(f"no images: {lake} has no masks in its traits table"
                       + ("" if manifest else " (give --manifest)"))
        from rootflow.studio.app import LOOPBACK_HOSTS

        hosts = None if not is_loopback(host) else LOOPBACK_HOSTS | {host}
        web = create_app(st, token=token, allowed_hosts=hosts)
        typer.echo(f"rootflow studio: http://{host}:{port}/ ({len(st.entries)} images; "
                   f"engines {', '.join(sorted(st.engines))})", err=True)
        try:
            uvicorn.run(web, host=host, port=port, log_level="warning")
        finally:
            st.close()
