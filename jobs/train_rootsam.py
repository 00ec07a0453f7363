#!/usr/bin/env python
"""`ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/train_rootsam.py ...`

The same code as `rootflow train rootsam ...` (see `rootflow train rootsam --help`). Inside a
submitted job `RAY_ADDRESS` is set, so the job attaches to the cluster instead of starting Ray.
Example (RootSAM's recipe on SAM2.1 Hiera-B+, 8 GPU workers, checkpoints on S3):

    python jobs/train_rootsam.py --data s3://lab/annotated/manifest.parquet \
        --base-checkpoint s3://lab/weights/sam2.1_hiera_base_plus.pt --base-sha256 <sha256> \
        --model-config hiera_base_plus --workers 8 --gpu \
        --storage-path s3://lab/runs --name rootsam-2025 --out s3://lab/models/rootsam-2025.pt
"""

import pathlib
import sys

# The submitted working dir is the repo root; make `rootflow` importable without installing it.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from rootflow.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["train", "rootsam", *sys.argv[1:]], prog_name="jobs/train_rootsam.py")
