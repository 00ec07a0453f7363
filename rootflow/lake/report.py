"""``rootflow report LAKE --out DIR``: a self-contained HTML page of what is in a lake.

``DIR/index.html`` plus PNG figures beside it (no scripts, no external links; open it from
disk or copy the folder anywhere):

* images processed and rejected per run (``runs``);
* root length density by depth band and date, one panel per tube, depth downward (``traits``,
  latest version per image of the reference producer);
* producers compared on the same images: one scatter per producer and model version against
  the reference (the given masks when the lake has them), with R² about the 1:1 line and bias;
* the season's root production and mortality by depth and date, per tube, when the
  ``dynamics`` table has rows.

The data functions here (:func:`rld_by_depth`, :func:`producer_pairs`, :func:`season`,
:func:`runs_summary`) are what ``notebooks/analyst_queries.ipynb`` calls too; the figures are
drawn by :mod:`rootflow.viz`. Reads ``s3://`` lakes like local ones; ``DIR`` is a local folder.
"""

from __future__ import annotations

import datetime as dt
import html
import math
from pathlib import Path
from typing import Any

from rootflow.io.storage import StorageLike
from rootflow.lake import query as q
from rootflow.lake.tables import Lake

DOF_CM = 0.2
"""Depth of field of a minirhizotron image (cm) for root length density (docs/lake.md)."""
MAX_TUBES = 24
"""Tubes drawn in the RLD and season figures (the first ones by number; the page says so)."""


def _lake(lake: Lake | str, storage_options: StorageLike = None) -> Lake:
    return lake if isinstance(lake, Lake) else Lake(lake, storage_options=storage_options)


def reference_producer(lake: Lake | str, *, storage_options: StorageLike = None) -> str | None:
    """The producer others are compared with: ``mask`` (the archive's own masks) when present,
    else the producer with the most rows; None for a lake without traits."""
    rows: dict[str, int] = {}
    for r in q.versions(lake, storage_options=storage_options).to_pylist():
        rows[r["model_name"]] = rows.get(r["model_name"], 0) + r["rows"]
    rows = {k: v for k, v in rows.items() if v}
    if not rows:
        return None
    return "mask" if "mask" in rows else max(sorted(rows), key=lambda k: rows[k])


def runs_summary(lake: Lake | str, *, storage_options: StorageLike = None) -> Any:
    """The runs table as pandas (oldest first): run id, kind, status, times, counts."""
    t = _lake(lake, storage_options).read("runs").to_pandas()
    return t.sort_values("started_at").reset_index(drop=True)


def rld_by_depth(lake: Lake | str, *, producer: str | None = None, dof_cm: float = DOF_CM,
                 storage_options: StorageLike = None) -> Any:
    """Root length density (cm cm⁻³) per tube, depth band and date (pandas), from the latest
    version per image of ``producer`` (default :func:`reference_producer`).

    RLD = length (cm) / (imaged area (cm²) x depth of field (cm)), summed over the images of
    the band and date (the query of ``docs/lake.md``)."""
    lk = _lake(lake, storage_options)
    producer = producer or reference_producer(lk)
    con = q.duckdb_connection(lk)
    return con.execute(f"""
        SELECT tube, depth AS depth_band_cm, CAST(captured_at AS DATE) AS date,
               COUNT(*) AS n_images,
               SUM(length_mm) / 10 / (SUM(analysed_area_mm2) / 100 * {float(dof_cm)})
                   AS rld_cm_per_cm3
        FROM traits WHERE model_name = ? AND length_mm IS NOT NULL
              AND analysed_area_mm2 > 0
        GROUP BY tube, depth_band_cm, date ORDER BY tube, date, depth_band_cm""",
                       [producer or ""]).df()


def producer_pairs(lake: Lake | str, *, reference: str | None = None,
                   storage_options: StorageLike = None) -> dict[tuple[str, str], Any]:
    """Per other producer and model version, the images it shares with the reference
    producer's latest rows: pandas frames with ``image_id``, ``reference_mm`` and ``value_mm``
    (root length; RootQuant's own regression ``rootquant_length_mm`` for ``rootquant``)."""
    lk = _lake(lake, storage_options)
    reference = reference or reference_producer(lk)
    if reference is None:
        return {}
    con = q.duckdb_connection(lk)
    df = con.execute("""
        SELECT a.image_id, a.length_mm AS reference_mm, b.model_name, b.model_version,
               CASE WHEN b.model_name = 'rootquant' THEN b.rootquant_length_mm
                    ELSE b.length_mm END AS value_mm
        FROM traits a JOIN traits_all b USING (image_id)
        WHERE a.model_name = ? AND NOT (b.model_name = a.model_name
                                        AND b.model_version = a.model_version)
        ORDER BY b.model_name, b.model_version, a.image_id""", [reference]).df()
    return {(str(n), str(v)): g.reset_index(drop=True)
            for (n, v), g in df.groupby(["model_name", "model_version"], sort=True)}


def season(lake: Lake | str, *, producer: str | None = None,
           storage_options: StorageLike = None) -> Any:
    """Root production and mortality (mm d⁻¹) per tube, depth band and date from the
    ``dynamics`` table (pairs with status ``ok``); None when the table has no rows."""
    lk = _lake(lake, storage_options)
    if not lk.exists("dynamics"):
        return None
    con = q.duckdb_connection(lk)
    producer = producer or reference_producer(lk)
    df = con.execute("""
        SELECT tube, depth AS depth_band_cm, CAST(captured_to AS DATE) AS date,
               SUM(produced_mm_per_day) AS produced_mm_per_day,
               SUM(lost_mm_per_day) AS lost_mm_per_day
        FROM dynamics WHERE status = 'ok' AND model_name = ?
        GROUP BY tube, depth_band_cm, date ORDER BY tube, date, depth_band_cm""",
                     [producer or ""]).df()
    return df if len(df) else None


# -- figures --------------------------------------------------------------------------------------
def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _grid(n: int, ncols: int, w: float, h: float) -> tuple[Any, list[Any]]:
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = _figure(max(w * ncols, 6.0), h * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def fig_runs(runs: Any) -> Any:
    from rootflow import viz

    fig = _figure(max(6.0, 0.7 * len(runs) + 2.5), 4.2)
    viz.runs_processed(runs, ax=fig.add_subplot())
    return fig


def fig_rld(rld: Any, *, producer: str, max_tubes: int = MAX_TUBES) -> Any:
    from rootflow import viz

    tubes = sorted(rld["tube"].unique())[:max_tubes]
    fig, axes = _grid(len(tubes), 4, 4.2, 4.4)
    from matplotlib import colormaps

    dates = sorted(rld["date"].unique())
    cmap = colormaps["viridis"]
    colour = {d: cmap(i / max(1, len(dates) - 1) * 0.9) for i, d in enumerate(dates)}
    for ax, tube in zip(axes, tubes, strict=True):
        g = rld[rld["tube"] == tube]
        viz.rld_profile(g, ax=ax)
        # dates are ordered: one sequential colour map for every panel (same date, same colour)
        for line, date in zip(ax.get_lines(), sorted(g["date"].unique()), strict=True):
            line.set_color(colour[date])
        ax.legend(title="date", fontsize=8)
        bands = sorted(g["depth_band_cm"].unique())
        if len(bands) <= 16:
            ax.set_yticks(bands, [f"{b:g}" for b in bands])
        ax.set_title(f"T{int(tube):03d}")
    fig.suptitle(f"Root length density by depth band and date\n({producer}, latest version "
                 f"per image)", fontsize=11)
    return fig


def fig_producers(pairs: dict[tuple[str, str], Any], *, reference: str) -> Any:
    from rootflow import viz

    fig, axes = _grid(len(pairs), 3, 4.3, 4.4)
    for ax, ((name, version), g) in zip(axes, pairs.items(), strict=True):
        what = "RootQuant length" if name == "rootquant" else f"length from {name} mask"
        viz.producers_scatter(g["reference_mm"], g["value_mm"],
                              x_label=f"length from {reference} (mm)",
                              y_label=f"{what} (mm)", title=f"{name} {version[:28]}", ax=ax)
    fig.suptitle("Producers compared on the same images")
    return fig


def fig_season(df: Any, *, max_tubes: int = MAX_TUBES) -> Any:
    from rootflow import viz

    tubes = sorted(df["tube"].unique())[:max_tubes]
    fig = _figure(11, 3.6 * len(tubes))
    axes = fig.subplots(len(tubes), 2, squeeze=False)
    for row, tube in zip(axes, tubes, strict=True):
        g = df[df["tube"] == tube]
        viz.season(g, value="produced_mm_per_day", ax=row[0])
        viz.season(g, value="lost_mm_per_day", ax=row[1], cmap="magma")
        for ax in row:
            ax.set_title(f"T{int(tube):03d}: {ax.get_title()}", fontsize=10)
    return fig


# -- the page ------------------------------------------------------------------------------------
def _table_html(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, dt.datetime):
            return v.strftime("%Y-%m-%d %H:%M:%S")
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


_CSS = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:13px;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
img{max-width:100%;border:1px solid #eee}.note{color:#666;font-size:13px}"""


def build_report(lake: Lake | str, out_dir: str | Path, *,
                 storage_options: StorageLike = None) -> dict[str, Any]:
    """Write ``out_dir/index.html`` and its PNG figures; returns ``{"index": path,
    "figures": {name: path}, "skipped": {name: why}}``."""
    lk = _lake(lake, storage_options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    sections: list[str] = []

    def save(name: str, fig: Any) -> str:
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        figures[name] = path
        return f'<img src="{path.name}" alt="{html.escape(name)}">'

    runs = runs_summary(lk)
    sec = "<h2>Runs</h2>"
    if len(runs):
        sec += save("runs", fig_runs(runs))
        sec += _table_html(runs.to_dict("records"), ["run_id", "job_kind", "status",
                                                     "started_at", "finished_at", "n_ok",
                                                     "n_rejected"])
    else:
        skipped["runs"] = "no runs recorded"
        sec += "<p class=note>No runs recorded yet.</p>"
    sections.append(sec)

    versions = q.versions(lk).to_pylist()
    sections.append("<h2>Model versions</h2><p class=note>Per image and producer the newest "
                    "version (by first commit) is \"latest\".</p>" + _table_html(
                        [v for v in versions if v["rows"]],
                        ["model_name", "model_version", "rows", "first_committed_at",
                         "first_run_id"]))

    reference = reference_producer(lk)
    sec = "<h2>Root length density by depth</h2>"
    rld = rld_by_depth(lk, producer=reference) if reference else None
    if rld is not None and len(rld):
        n_tubes = rld["tube"].nunique()
        sec += (f"<p class=note>Producer <b>{html.escape(reference or '')}</b>; depth of "
                f"field {DOF_CM * 10:g} mm; {n_tubes} tube(s)"
                + (f", the first {MAX_TUBES} drawn" if n_tubes > MAX_TUBES else "") + ".</p>")
        sec += save("rld_by_depth", fig_rld(rld, producer=reference or ""))
    else:
        skipped["rld_by_depth"] = "no traits rows with length and imaged area"
        sec += "<p class=note>No traits yet.</p>"
    sections.append(sec)

    sec = "<h2>Producers compared on the same images</h2>"
    pairs = producer_pairs(lk, reference=reference) if reference else {}
    pairs = {k: g for k, g in pairs.items() if g["value_mm"].notna().any()}
    if pairs:
        sec += (f"<p class=note>Reference: latest <b>{html.escape(reference or '')}</b> row per "
                "image. R² about the 1:1 line; bias = mean(producer - reference).</p>")
        sec += save("producers", fig_producers(pairs, reference=reference or ""))
    else:
        skipped["producers"] = "fewer than two producers on the same images"
        sec += "<p class=note>Only one producer so far: nothing to compare.</p>"
    sections.append(sec)

    sec = "<h2>Season: root production and mortality</h2>"
    dyn = season(lk, producer=reference)
    if dyn is not None:
        sec += save("season", fig_season(dyn))
    else:
        skipped["season"] = "no dynamics rows (run `rootflow dynamics`)"
        sec += "<p class=note>No <code>dynamics</code> rows yet (see docs/dynamics.md).</p>"
    sections.append(sec)

    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>rootflow lake report"
            f"</title><style>{_CSS}</style></head><body><h1>Lake report</h1>"
            f"<p class=note>{html.escape(lk.uri)} &middot; written {when}</p>"
            + "".join(sections) + "</body></html>")
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return {"index": index, "figures": figures, "skipped": skipped}
