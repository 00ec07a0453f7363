"""What turns a click into a new mask: RootSAM refinement or forest scribble retraining.

Both engines take the image, the mask being corrected and the clicks so far, and return the
new mask; neither writes anything. Coordinates are integer image pixels (``x`` = column,
``y`` = row); label 1 = root, 0 = background.

* :class:`RootSAMEngine` calls :meth:`RootSAMPredictor.refine` (its public signature only)
  on each tile the new click touches, with that tile's clicks and the current mask as the
  mask prompt: only those tiles are re-decoded, from tile embeddings the predictor caches.
  :meth:`RootSAMEngine.prefetch` fills that cache for the next images of the queue, a tile
  per call so a click never waits behind a whole scan.
* :class:`ForestEngine` turns clicks and brush/eraser strokes into scribbles (1 root, 0
  background, -1 unlabelled) on crops around them, retrains a small forest on *every*
  scribble of the session (RootPainter's corrective loop: the next image starts better) and
  re-predicts a window around the click.

:func:`simulated_click` is the clicker of the NoC metric (benchmarks/studio_bench.py), the
RootSAM evaluation's and training's own (:func:`rootflow.inference.prompts.next_click`, SAM2's
"center" clicker): the next click goes to the error pixel farthest from its error region's
border (the centre of the thickest error), positive on a missed root, negative on a false one.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Click:
    """One click: integer pixel (``x`` column, ``y`` row) and label (1 root, 0 background)."""

    x: int
    y: int
    label: int

    def to_json(self) -> dict[str, int]:
        return {"x": self.x, "y": self.y, "label": self.label}


@dataclasses.dataclass(frozen=True)
class Stroke:
    """A brush (root) or eraser (background) stroke: a polyline of integer pixels."""

    mode: str  # "brush" | "eraser"
    radius: int
    points: tuple[tuple[int, int], ...]

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "radius": self.radius, "points": [list(p) for p in self.points]}

    def paint(self, shape: tuple[int, int]) -> np.ndarray:
        """Bool ``shape`` array of the pixels this stroke covers."""
        out = np.zeros(shape, np.uint8)
        pts = np.asarray(self.points, np.int32).reshape(-1, 1, 2)
        if len(pts) == 1:
            cv2.circle(out, tuple(int(v) for v in pts[0, 0]), self.radius, 1, -1)
        else:
            cv2.polylines(out, [pts], False, 1, thickness=2 * self.radius + 1)
            for p in pts[:, 0]:
                cv2.circle(out, (int(p[0]), int(p[1])), self.radius, 1, -1)
        return out.astype(bool)


@dataclasses.dataclass
class EditResult:
    """An engine's answer to one click."""

    mask: np.ndarray
    seconds: float
    region: tuple[int, int, int, int]  # y0, x0, y1, x1 that may have changed
    note: str = ""
    tiles: list[int] = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------------------ RootSAM
class RootSAMEngine:
    """Clicks -> :meth:`RootSAMPredictor.refine` on the touched tiles only.

    Each touched tile of the predictor's grid is refined as its own one-tile image (the crop
    of that tile, cache key ``<image>#<tile>``): the predictor then decodes that tile alone
    from its cached embedding and stitches nothing else, so a click on a 2550 x 2273 scan
    costs one decoder call, not a pass over the scan's other tiles. The refined tile replaces
    the mask where it owns the stitch (its stitch weight >= 1/2: up to the middle of each
    overlap band), so no seam appears at the tile's own edge inside a neighbour.
    """

    name = "rootsam"

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor
        self.lock = threading.Lock()
        self._prefetched: set[str] = set()

    @property
    def version(self) -> str:
        return str(self.predictor.version)

    def grid(self, h: int, w: int) -> Any:
        from rootflow.inference.tiling import make_grid

        return make_grid(h, w, tile=self.predictor.tile, overlap=self.predictor.overlap)

    def _box(self, g: Any, k: int) -> tuple[int, int, int, int]:
        y0, x0 = g.origins()[k]
        return y0, x0, min(g.height, y0 + g.tile), min(g.width, x0 + g.tile)

    def click(self, key: str, rgb: np.ndarray, mask: np.ndarray, clicks: Sequence[Click],
              new: Click) -> EditResult:
        t0 = time.perf_counter()
        h, w = mask.shape
        g = self.grid(h, w)
        touched = sorted(g.tiles_containing(new.x + 0.5, new.y + 0.5))
        out = mask.copy()
        boxes = []
        for k in touched:
            y0, x0, y1, x1 = self._box(g, k)
            sel = [c for c in clicks if y0 <= c.y < y1 and x0 <= c.x < x1]
            pts = np.array([[c.x - x0 + 0.5, c.y - y0 + 0.5] for c in sel], np.float32)
            labs = np.array([c.label for c in sel], np.int32)
            with self.lock:
                res, _ = self.predictor.refine(
                    np.ascontiguousarray(rgb[y0:y1, x0:x1]), points=pts, labels=labs,
                    previous=np.ascontiguousarray(mask[y0:y1, x0:x1]), key=f"{key}#{k}")
            # The tile owns the part of itself where its stitch weight is at least one half
            # (up to the middle of each overlap band), as in the stitched whole-image mask: its
            # edge pixels, decoded with the least context, never overwrite a neighbour's half.
            own = g.weights(k)[: y1 - y0, : x1 - x0] >= 0.5
            win = out[y0:y1, x0:x1]
            win[own] = np.asarray(res.mask, bool)[own]
            ys, xs = np.nonzero(own)
            boxes.append((y0 + int(ys.min()), x0 + int(xs.min()),
                          y0 + int(ys.max()) + 1, x0 + int(xs.max()) + 1))
        region = (min(b[0] for b in boxes), min(b[1] for b in boxes),
                  max(b[2] for b in boxes), max(b[3] for b in boxes))
        return EditResult(mask=out, seconds=time.perf_counter() - t0, region=region,
                          tiles=touched)

    def prefetch(self, key: str, rgb: np.ndarray, stop: threading.Event | None = None,
                 tiles: Sequence[int] | None = None) -> int:
        """Encode (and cache) every tile of an image (or ``tiles``), one tile per call;
        returns the number of tiles encoded."""
        if key in self._prefetched:
            return 0
        h, w = rgb.shape[:2]
        g = self.grid(h, w)
        n = 0
        for k in (range(len(g)) if tiles is None else tiles):
            if stop is not None and stop.is_set():
                return n
            y0, x0, y1, x1 = self._box(g, k)
            pt = np.array([[(x1 - x0) / 2, (y1 - y0) / 2]], np.float32)
            with self.lock:
                self.predictor.refine(np.ascontiguousarray(rgb[y0:y1, x0:x1]), points=pt,
                                      labels=np.ones(1, np.int32),
                                      previous=np.zeros((y1 - y0, x1 - x0), bool),
                                      key=f"{key}#{k}")
            n += 1
        if tiles is None:
            self._prefetched.add(key)
        return n


# ------------------------------------------------------------------------------ forest
def studio_forest_config() -> Any:
    """A small, fast forest for interactive retraining (seconds on a few scribbles)."""
    from rootflow.models.forest import ForestConfig

    return ForestConfig(sigmas=(0.7, 1.6, 3.5, 5.0), autocontext=False, n_estimators=30,
                        num_leaves=15, max_depth=5, min_data_in_leaf=5,
                        samples_per_class=4000, threshold_samples=8000, tile=256)


@dataclasses.dataclass
class _Scribbles:
    rgb: np.ndarray
    labels: np.ndarray  # int8, -1 unlabelled


class ForestEngine:
    """Clicks and strokes -> scribbles -> a forest retrained on all scribbles so far.

    Args:
        base: a trained forest proposing the first masks (``--forest-model``), or None.
        cfg: the retrained forest's config (default :func:`studio_forest_config`).
        click_radius: px radius of the scribble disk a click paints.
        window: side of the window re-predicted around a click (None: the whole image).
        max_seconds: wall-clock budget of one retrain.
    """

    name = "forest"

    def __init__(self, base: Any = None, *, cfg: Any = None, click_radius: int = 4,
                 window: int | None = 512, max_seconds: float = 20.0) -> None:
        from rootflow.models.forest import feature_halo

        self.base = base
        self.cfg = cfg or studio_forest_config()
        self.halo = feature_halo(self.cfg)
        self.click_radius = click_radius
        self.window = window
        self.max_seconds = max_seconds
        self.model: Any = None  # the latest retrained forest
        self.n_retrains = 0
        self.retrain_seconds: list[float] = []
        self._scribbles: dict[str, _Scribbles] = {}
        self.lock = threading.Lock()

    @property
    def version(self) -> str:
        if self.model is not None:
            return str(self.model.version)
        return str(self.base.version) if self.base is not None else "forest-untrained"

    def propose(self, rgb: np.ndarray) -> np.ndarray | None:
        """The current forest's mask of a whole image (None before any forest exists)."""
        m = self.model or self.base
        return None if m is None else np.asarray(m.predict(rgb), bool)

    def _labels(self, key: str, rgb: np.ndarray) -> _Scribbles:
        s = self._scribbles.get(key)
        if s is None:
            s = self._scribbles[key] = _Scribbles(rgb, np.full(rgb.shape[:2], -1, np.int8))
        return s

    def set_scribbles(self, key: str, rgb: np.ndarray, clicks: Sequence[Click],
                      strokes: Sequence[Stroke]) -> None:
        """Replace an image's scribbles by those of these clicks and strokes (undo/redo)."""
        h, w = rgb.shape[:2]
        lab = np.full((h, w), -1, np.int8)
        for st in strokes:
            lab[st.paint((h, w))] = 1 if st.mode == "brush" else 0
        for c in clicks:
            cv2.circle(lab, (c.x, c.y), self.click_radius, int(c.label), -1)
        self._scribbles[key] = _Scribbles(rgb, lab)

    def n_labelled(self) -> dict[int, int]:
        n = {0: 0, 1: 0}
        for s in self._scribbles.values():
            for v in (0, 1):
                n[v] += int((s.labels == v).sum())
        return n

    def _training_crops(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        images, labels = [], []
        m = self.halo + 8
        for s in self._scribbles.values():
            ys, xs = np.nonzero(s.labels >= 0)
            if not len(ys):
                continue
            h, w = s.labels.shape
            # one crop per cluster of scribbles (grid cells of 256 px), halo around it
            cells = {(y // 256, x // 256) for y, x in zip(ys.tolist(), xs.tolist(), strict=True)}
            for cy, cx in sorted(cells):
                y0, x0 = max(0, cy * 256 - m), max(0, cx * 256 - m)
                y1, x1 = min(h, (cy + 1) * 256 + m), min(w, (cx + 1) * 256 + m)
                images.append(s.rgb[y0:y1, x0:x1])
                labels.append(s.labels[y0:y1, x0:x1])
        return images, labels

    def restore_model(self, model: Any) -> None:
        """Put back an earlier retrained forest (undo/redo; None: back to ``base``)."""
        with self.lock:
            self.model = model

    def retrain(self) -> str:
        """Retrain on every scribble so far; returns a note ("" when it trained)."""
        from rootflow.models.forest import ForestError, fit_forest

        n = self.n_labelled()
        if not n[0] or not n[1]:
            return "forest: needs at least one root and one background scribble to retrain"
        images, labels = self._training_crops()
        t0 = time.perf_counter()
        flog = logging.getLogger("rootflow.models.forest")
        level = flog.level
        # a few scribbles always leave a fold without one class: the in-sample threshold is
        # expected here, so fit_forest's warning about it would only flood the server log
        flog.setLevel(logging.ERROR)
        try:
            model = fit_forest(images, labels, self.cfg, max_seconds=self.max_seconds,
                               progress=False, num_threads=2)
        except ForestError as e:
            return f"forest: {e}"
        finally:
            flog.setLevel(level)
        self.model = model
        self.n_retrains += 1
        self.retrain_seconds.append(time.perf_counter() - t0)
        return ""

    def predict_window(self, rgb: np.ndarray, cy: int, cx: int) -> tuple[np.ndarray,
                                                                         tuple[int, int, int, int]]:
        """The current forest's mask in the window around ``(cy, cx)`` and that window."""
        h, w = rgb.shape[:2]
        if self.window is None:
            return np.asarray(self.model.predict(rgb), bool), (0, 0, h, w)
        r = self.window // 2
        y0, x0, y1, x1 = max(0, cy - r), max(0, cx - r), min(h, cy + r), min(w, cx + r)
        py0, px0 = max(0, y0 - self.halo), max(0, x0 - self.halo)
        py1, px1 = min(h, y1 + self.halo), min(w, x1 + self.halo)
        pred = np.asarray(self.model.predict(np.ascontiguousarray(rgb[py0:py1, px0:px1])), bool)
        return pred[y0 - py0:y1 - py0, x0 - px0:x1 - px0], (y0, x0, y1, x1)

    def click(self, key: str, rgb: np.ndarray, mask: np.ndarray, clicks: Sequence[Click],
              new: Click, strokes: Sequence[Stroke] = ()) -> EditResult:
        t0 = time.perf_counter()
        with self.lock:
            self.set_scribbles(key, rgb, clicks, strokes)
            note = self.retrain()
            out = mask.copy()
            if self.model is not None and not note:
                pred, region = self.predict_window(rgb, new.y, new.x)
                y0, x0, y1, x1 = region
                out[y0:y1, x0:x1] = pred
            else:
                region = (max(0, new.y - self.click_radius), max(0, new.x - self.click_radius),
                          new.y + self.click_radius + 1, new.x + self.click_radius + 1)
            lab = self._scribbles[key].labels  # scribbles always win over the prediction
            out[lab == 1] = True
            out[lab == 0] = False
        return EditResult(mask=out, seconds=time.perf_counter() - t0, region=region, note=note)


# ------------------------------------------------------------------------------ clicker
def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Root-class IoU (1.0 when both are empty)."""
    union = int(np.logical_or(a, b).sum())
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum()) / union


def simulated_click(pred: np.ndarray, truth: np.ndarray) -> Click | None:
    """The next click of the NoC clicker (the RootSAM issue's,
    :func:`rootflow.inference.prompts.next_click`, SAM2's "center" clicker): the error pixel
    farthest from its error region's border, positive on a missed root, negative on a false
    one; as an integer pixel."""
    from rootflow.inference.prompts import next_click

    got = next_click(pred, truth)
    if got is None:
        return None
    x, y, label = got
    return Click(int(x), int(y), int(label))


def deepest_click(region: np.ndarray, label: int) -> Click | None:
    """A click at the pixel deepest inside ``region`` (largest distance to its border)."""
    if not region.any():
        return None
    dist = cv2.distanceTransform(np.pad(region, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return Click(int(x), int(y), label)


def first_forest_clicks(truth: np.ndarray) -> list[Click]:
    """The forest needs a root and a background label before it can train: the simulated
    person starts with one of each, deepest inside the true root and background (both count
    as clicks in NoC)."""
    return [c for c in (deepest_click(truth, 1), deepest_click(~truth, 0)) if c is not None]
