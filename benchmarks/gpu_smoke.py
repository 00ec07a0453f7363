"""GPU smoke test: a few RootSAM training steps (bf16 autocast, gradient clipping) and tiled
RootSAM and RootQuant inference on one CUDA device; prints images/s and peak memory as JSON
lines.

    python benchmarks/gpu_smoke.py --variant hiera_base_plus --steps 20 --images 4

Weights are random (no SAM2.1 download); speed and memory do not depend on their values.
Without a CUDA device it prints one line saying so and exits 1 (nothing is measured on CPU:
``benchmarks/rootsam_throughput.py`` is the CPU benchmark).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="hiera_base_plus")
    ap.add_argument("--steps", type=int, default=10, help="training steps (after 2 warm-up)")
    ap.add_argument("--batch", type=int, default=4, help="training patches per step")
    ap.add_argument("--patch", type=int, default=1024)
    ap.add_argument("--click-rounds", type=int, default=2)
    ap.add_argument("--images", type=int, default=4, help="scans for tiled inference")
    ap.add_argument("--image-hw", type=int, nargs=2, default=(2273, 2550))
    ap.add_argument("--rootquant-backbone", default="inception_resnet_v2")
    ap.add_argument("--no-rootquant", action="store_true")
    args = ap.parse_args()

    import numpy as np
    import torch

    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device (torch.cuda.is_available() is False): nothing "
              "measured; run this on a machine with a GPU", file=sys.stderr)
        return 1

    from rootflow.inference.prompts import PromptPolicy
    from rootflow.inference.rootsam import RootSAMInferenceConfig, RootSAMPredictor
    from rootflow.models.rootsam import build_rootsam
    from rootflow.training.losses import LossConfig, signed_distance_map
    from rootflow.training.rootsam_task import episode_loss, freeze_encoder, interactive_rounds

    dev = torch.device("cuda")
    gpu = torch.cuda.get_device_name(dev)
    rng = np.random.default_rng(0)

    def synth(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        img = rng.integers(40, 90, (h, w, 3), dtype=np.uint8)
        yy, xx = np.mgrid[:h, :w]
        mask = np.zeros((h, w), bool)
        for k in range(4):
            mask |= np.abs(yy - xx * (0.4 + 0.3 * k) - k * h / 4) < 3 + k
        img[mask] = (215, 205, 185)
        return img, mask

    # -- training steps ----------------------------------------------------------------------
    model = build_rootsam(args.variant, device=dev)
    freeze_encoder(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    policy = PromptPolicy()
    pairs = [synth(args.patch, args.patch) for _ in range(args.batch)]
    images = torch.from_numpy(np.stack([p[0] for p in pairs]))
    masks = torch.from_numpy(np.stack([p[1] for p in pairs])).to(dev)
    sdm = torch.from_numpy(np.stack([signed_distance_map(p[1]) for p in pairs])).to(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    t0 = 0.0
    for step in range(args.steps + 2):
        if step == 2:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        drawn = [policy.training_prompts(p[1], rng=rng) for p in pairs]
        pts = torch.from_numpy(np.stack([d[0] for d in drawn]))
        labs = torch.from_numpy(np.stack([d[1] for d in drawn]))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with torch.no_grad():
                x = model.preprocess(images)
                if args.patch != model.image_size:
                    x = torch.nn.functional.interpolate(x, size=model.image_size,
                                                        mode="bilinear", antialias=True)
                emb = model.encode(x)
            rounds = interactive_rounds(model, emb, pts, labs, masks, patch=args.patch,
                                        click_rounds=args.click_rounds)
        loss, _ = episode_loss(model, rounds, masks.unsqueeze(1).float(), sdm.unsqueeze(1),
                               LossConfig(), patch=args.patch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(json.dumps({"case": "rootsam_train", "variant": args.variant, "gpu": gpu,
                      "precision": "bf16-autocast", "patch": args.patch, "batch": args.batch,
                      "click_rounds": args.click_rounds, "steps": args.steps,
                      "patches_per_s": round(args.steps * args.batch / dt, 2),
                      "peak_mem_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)}),
          flush=True)
    del opt, rounds, loss, emb
    torch.cuda.empty_cache()

    # -- tiled inference ---------------------------------------------------------------------
    h, w = args.image_hw
    scans = [synth(h, w)[0] for _ in range(args.images)]
    pred = RootSAMPredictor(RootSAMInferenceConfig(variant=args.variant, device="cuda"),
                            model=model.eval())
    pred.predict(scans[:1])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    res = pred.predict(scans)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(json.dumps({"case": "rootsam_infer", "variant": args.variant, "gpu": gpu,
                      "image_hw": [h, w], "tiles_per_image": res[0].n_tiles,
                      "tile_batch": pred.tile_batch_size, "precision": pred.params["precision"],
                      "images_per_s": round(len(scans) / dt, 3),
                      "peak_mem_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)}),
          flush=True)

    if not args.no_rootquant:
        from rootflow.inference.rootquant import RootQuantPredictor
        from rootflow.models.rootquant import RootQuant, RootQuantConfig

        del pred, model
        torch.cuda.empty_cache()
        rq = RootQuant(RootQuantConfig(backbone=args.rootquant_backbone))
        rqp = RootQuantPredictor(rq, device="cuda", amp=True, tile_batch=16)
        frames = [rng.integers(0, 255, (552, 736, 3), dtype=np.uint8) for _ in range(32)]
        rqp.predict_many(frames[:4], dpis=[254.0] * 4)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        rqp.predict_many(frames, dpis=[254.0] * len(frames))
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(json.dumps({"case": "rootquant_infer", "backbone": args.rootquant_backbone,
                          "gpu": gpu, "images_per_s": round(len(frames) / dt, 2),
                          "peak_mem_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30,
                                                2)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
