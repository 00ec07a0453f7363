"""Seeded toy minirhizotron pairs for RootSAM training tests (written as files, like an archive).

Dark soil with speckle, a few bright curved "roots" of 2-6 px drawn with OpenCV, and the exact
mask. Tiny (96-160 px) so the ``test`` SAM2 variant trains on them in seconds.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa


def toy_pair(seed: int, *, height: int = 128, width: int = 160,
             n_roots: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.normal(70, 12, (height, width, 3)).clip(0, 255).astype(np.uint8)
    image[..., 0] = np.clip(image[..., 0].astype(int) + 20, 0, 255)  # brownish soil
    mask = np.zeros((height, width), np.uint8)
    for _ in range(n_roots):
        _draw_root(mask, rng, x_frac=(0, 1), thick_range=(2, 6), wiggle=0.15)
    root = mask > 0
    image[root] = np.clip(rng.normal(200, 15, (int(root.sum()), 3)), 0, 255).astype(np.uint8)
    return image, root


def write_pairs(folder: Path, n: int, *, seed: int = 0, **kw: int) -> Path:
    """``n`` toy pairs as ``toy_<i>.png`` + ``toy_<i>_mask.png`` (0/255) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, mask = toy_pair(seed + i, **kw)
        cv2.imwrite(str(folder / f"toy_{i:03d}.png"), image[..., ::-1])
        cv2.imwrite(str(folder / f"toy_{i:03d}_mask.png"), mask.astype(np.uint8) * 255)
    return folder


def write_manifest_csv(folder: Path, path: Path) -> Path:
    """An annotated manifest CSV (image_uri, mask_uri, split) of the pairs in ``folder``."""
    images = sorted(p for p in folder.glob("*.png") if not p.stem.endswith("_mask"))
    split = ["val" if i % 4 == 3 else "train" for i in range(len(images))]
    table = pa.table({"image_uri": [str(p) for p in images],
                      "mask_uri": [str(p.with_name(p.stem + "_mask.png")) for p in images],
                      "split": split})
    import pyarrow.csv as pacsv

    pacsv.write_csv(table, path)
    return path


def _draw_root(target: np.ndarray, rng: np.random.Generator, *,
               x_frac: tuple[float, float], thick_range: tuple[int, int],
               wiggle: float = 0.1) -> None:
    """Draw one wandering root from the top edge into ``target`` (255): it starts at a uniform
    x in ``x_frac`` of the width, is ``thick_range`` (integers, high exclusive) px wide and turns by
    N(0, ``wiggle``) radians every 4 px."""
    height, width = target.shape[:2]
    x, y = float(rng.uniform(*x_frac) * width), 0.0
    angle = rng.uniform(np.pi / 3, 2 * np.pi / 3)
    thick = int(rng.integers(*thick_range))
    pts = []
    while 0 <= y < height and 0 <= x < width:
        pts.append((int(x), int(y)))
        angle += rng.normal(0, wiggle)
        x, y = x + 4 * np.cos(angle), y + 4 * np.sin(angle)
    if len(pts) > 1:
        cv2.polylines(target, [np.array(pts, np.int32)], False, 255, thick)


def thick_pair(seed: int, *, size: int = 128, n_roots: int = 2,
               decoys: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A toy view a small model can resolve (its logits are 4 px): ``n_roots`` bright roots
    ``size``/20 to ``size``/12 px wide on speckled soil, ``size`` x ``size``. ``decoys`` more
    roots look the same but are not in the mask (a dead root the annotator skipped): only a
    click can tell them apart, which is what corrective clicks are for."""
    rng = np.random.default_rng(seed)
    image = rng.normal(70, 12, (size, size, 3)).clip(0, 255).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    bright = np.zeros((size, size), np.uint8)
    for k in range(n_roots + decoys):
        _draw_root(mask if k < n_roots else bright, rng, x_frac=(0.15, 0.85),
                   thick_range=(size // 20, size // 12 + 1))
    root = mask > 0
    shown = root | (bright > 0)
    image[shown] = np.clip(rng.normal(200, 15, (int(shown.sum()), 3)), 0, 255).astype(np.uint8)
    return image, root


def stub_pair(seed: int, *, size: int = 128, n_roots: int = 2, n_stubs: int = 2,
              ) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, bool]]]:
    """A :func:`thick_pair`-like view with ``n_stubs`` short root pieces (``size``/9 to
    ``size``/6 px long, as wide as the roots) that look alike, each annotated as root or not
    with probability 1/2 (a live root tip vs a dead fragment the annotator skipped). The image
    cannot tell them apart, so a prompt-free pass must guess; a click on one settles it: the
    errors a corrective click exists for. Returns the image, the mask and each stub's
    ``(pixels, is_root)``."""
    rng = np.random.default_rng(seed)
    image = rng.normal(70, 12, (size, size, 3)).clip(0, 255).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(n_roots):
        _draw_root(mask, rng, x_frac=(0.15, 0.85),
                   thick_range=(size // 20, size // 12 + 1))
    shown = mask > 0
    stubs: list[tuple[np.ndarray, bool]] = []
    for _ in range(50 * n_stubs):
        if len(stubs) == n_stubs:
            break
        length = rng.uniform(size / 9, size / 6)
        angle = rng.uniform(0, np.pi)
        cx, cy = rng.uniform(0.15, 0.85, 2) * size
        dx, dy = 0.5 * length * np.cos(angle), 0.5 * length * np.sin(angle)
        stub = np.zeros((size, size), np.uint8)
        cv2.line(stub, (int(cx - dx), int(cy - dy)), (int(cx + dx), int(cy + dy)), 255,
                 int(rng.integers(size // 20, size // 12 + 1)))
        s = stub > 0
        grown = cv2.dilate(stub, np.ones((7, 7), np.uint8)) > 0
        if (grown & shown).any():  # apart from roots and other stubs: its own error region
            continue
        is_root = bool(rng.random() < 0.5)
        stubs.append((s, is_root))
        shown |= s
        if is_root:
            mask[s] = 255
    root = mask > 0
    image[shown] = np.clip(rng.normal(200, 15, (int(shown.sum()), 3)), 0, 255).astype(np.uint8)
    return image, root, stubs


def train_small_decoder(policy, *, variant: str = "micro", n_images: int = 8, steps: int = 60,
                        batch: int = 4, click_rounds: int = 2, lr: float = 1e-3,
                        seed: int = 0, decoys: int = 0, rule_share: float = 0.5,
                        stubs: int = 0):
    """A small RootSAM (``micro`` variant: 128 px input, decoder of width 64) whose decoder is
    trained by RootSAM's own training step (:func:`interactive_rounds` + :func:`episode_loss`,
    prompts from ``policy``) on :func:`thick_pair` views (or :func:`stub_pair` views with
    ``stubs`` ambiguous root pieces each) of the model's input size, with the (frozen,
    random-init) encoder's outputs computed once. Returns the model (eval mode)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only spin on a busy host
    try:
        return _train(policy, variant=variant, n_images=n_images, steps=steps, batch=batch,
                      click_rounds=click_rounds, lr=lr, seed=seed, decoys=decoys,
                      rule_share=rule_share, stubs=stubs)
    finally:
        torch.set_num_threads(threads)


def _train(policy, *, variant, n_images, steps, batch, click_rounds, lr, seed, decoys,
           rule_share, stubs):
    import torch

    from rootflow.models.rootsam import build_rootsam
    from rootflow.training.losses import LossConfig, signed_distance_map
    from rootflow.training.rootsam_task import episode_loss, freeze_encoder, interactive_rounds

    torch.manual_seed(seed)
    model = build_rootsam(variant)
    freeze_encoder(model)
    pairs = [stub_pair(1000 + seed * 100 + i, size=model.image_size, n_stubs=stubs)[:2]
             if stubs else
             thick_pair(1000 + seed * 100 + i, size=model.image_size, decoys=decoys)
             for i in range(n_images)]
    with torch.no_grad():
        emb = model.encode(model.preprocess(np.stack([p[0] for p in pairs])))
    masks = torch.from_numpy(np.stack([p[1] for p in pairs]))
    sdms = torch.from_numpy(np.stack([signed_distance_map(p[1]) for p in pairs]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    size = model.image_size
    for _ in range(steps):
        idx = rng.choice(n_images, size=batch, replace=False)
        drawn = [policy.training_prompts(pairs[i][1], rng=rng) for i in idx]
        pts = torch.from_numpy(np.stack([d[0] for d in drawn]))
        labs = torch.from_numpy(np.stack([d[1] for d in drawn]))
        mask = masks[idx]
        rounds = interactive_rounds(model, emb.index(torch.from_numpy(idx)), pts, labs, mask,
                                    patch=size, click_rounds=click_rounds, policy=policy,
                                    rule_share=rule_share, rng=rng)
        loss, _ = episode_loss(model, rounds, mask.unsqueeze(1).float(),
                               sdms[idx].unsqueeze(1), LossConfig(), patch=size)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()
