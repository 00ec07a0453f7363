#!/usr/bin/env python
"""`ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/train_rootquant.py ...`

The same code as `rootflow train rootquant ...` (see `rootflow train rootquant --help`). Inside a
submitted job `RAY_ADDRESS` is set, so the job attaches to the cluster instead of starting Ray.
Example (fine-tune a checkpoint to a new species on 4 GPU workers, checkpoints on S3):

    python jobs/train_rootquant.py --labels s3://lab/soy/labels.csv --manifest s3://lab/soy/manifest.parquet \
        --init-from s3://lab/models/rootquant-maize.pt --head-only-epochs 3 --epochs 15 \
        --workers 4 --gpu --storage-path s3://lab/runs --name rq-soy --set optim.backbone_lr=1e-5
"""

import pathlib
import sys

# The submitted working dir is the repo root; make `rootflow` importable without installing it.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from rootflow.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["train", "rootquant", *sys.argv[1:]], prog_name="jobs/train_rootquant.py")
