"""A trivial task for the generic loop: fit ``y = 3x - 1`` with a 1->1 linear layer.

Small enough that an epoch takes milliseconds, real enough that the loss must fall, DDP must
average gradients, and a checkpoint must carry the optimiser. ``fail_at_epoch`` makes worker
``fail_rank`` raise once (a marker file remembers that it already did), to test recovery.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import torch

from rootflow.models import checkpoint as ckpt_io
from rootflow.training.loop import LoopContext


@dataclasses.dataclass(frozen=True)
class LineConfig:
    n_train: int = 64
    n_val: int = 16
    lr: float = 0.05
    batch_size: int = 8
    fail_at_epoch: int | None = None
    fail_rank: int = 0
    marker_dir: str | None = None  # where the "already failed" marker and the event log go


class LineTask:
    def __init__(self, cfg: LineConfig) -> None:
        self.cfg = cfg

    def _log(self, line: str) -> None:
        if self.cfg.marker_dir:
            with open(os.path.join(self.cfg.marker_dir, f"events-rank{self.ctx.world_rank}.log"),
                      "a") as f:
                f.write(line + "\n")

    def setup(self, ctx: LoopContext) -> None:
        self.ctx = ctx
        g = torch.Generator().manual_seed(123)
        x = torch.rand(self.cfg.n_train + self.cfg.n_val, 1, generator=g) * 2 - 1
        y = 3 * x - 1
        data = list(zip(x, y, strict=True))
        self.train_data, self.val_data = data[: self.cfg.n_train], data[self.cfg.n_train:]
        self.model = ctx.prepare_model(torch.nn.Linear(1, 1))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=self.cfg.lr)
        self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(self.opt, mode="min", patience=1)
        self.train_loader = ctx.loader(self.train_data, batch_size=self.cfg.batch_size,
                                       shuffle=True)
        self.val_loader = ctx.loader(self.val_data, batch_size=self.cfg.batch_size,
                                     shuffle=False)
        self._log("setup")

    def train_epoch(self, epoch: int) -> dict[str, float]:
        if (self.cfg.fail_at_epoch == epoch and self.ctx.world_rank == self.cfg.fail_rank
                and self.cfg.marker_dir):
            marker = os.path.join(self.cfg.marker_dir, "failed-once")
            if not os.path.exists(marker):
                open(marker, "w").close()
                raise RuntimeError(f"injected failure at epoch {epoch}")
        self._log(f"train {epoch}")
        self.model.train()
        total, n = 0.0, 0
        for x, y in self.train_loader:
            loss = torch.nn.functional.mse_loss(self.model(x), y)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            total, n = total + float(loss) * len(x), n + len(x)
        return {"loss": total / max(n, 1), "lr": self.opt.param_groups[0]["lr"]}

    def validate(self, epoch: int) -> dict[str, float]:
        self.model.eval()
        sums = {"se": 0.0, "n": 0.0}
        with torch.no_grad():
            for x, y in self.val_loader:
                sums["se"] += float(((self.model(x) - y) ** 2).sum())
                sums["n"] += len(x)
        sums = self.ctx.all_reduce(sums, op="sum")
        return {"loss": sums["se"] / max(sums["n"], 1.0)}

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self.sched.step(metrics["val_loss"])

    def state_dict(self) -> dict[str, Any]:
        return {"model": LoopContext.unwrap(self.model).state_dict(),
                "opt": self.opt.state_dict(), "sched": self.sched.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        LoopContext.unwrap(self.model).load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self._log("load_state_dict")

    def export(self, uri: str) -> str:
        model = LoopContext.unwrap(self.model)
        ckpt_io.save({"model": model.state_dict(), "best": self.ctx.best or {}}, uri,
                     storage_options=self.ctx.storage_options)
        return uri
