#!/usr/bin/env python
"""`ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/reprocess.py ...`

The same code as `rootflow reprocess ...` (see `rootflow reprocess --help` for the arguments). Inside a
submitted job `RAY_ADDRESS` is set, so the job attaches to the cluster instead of starting Ray.
"""

import pathlib
import sys

# The submitted working dir is the repo root; make `rootflow` importable without installing it.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from rootflow.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["reprocess", *sys.argv[1:]], prog_name="jobs/reprocess.py")
