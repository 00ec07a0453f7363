#!/usr/bin/env python
"""`ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/dynamics.py LAKE ...`

The same code as `rootflow dynamics ...` (see `rootflow dynamics --help`). Inside a submitted job
`RAY_ADDRESS` is set, so the job attaches to the cluster instead of starting Ray. Nightly, after
the processing job: `python jobs/dynamics.py s3://lab/lake --since YESTERDAY` adds the newest
sessions' pairs without recomputing the season.
"""

import pathlib
import sys

# The submitted working dir is the repo root; make `rootflow` importable without installing it.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from rootflow.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["dynamics", *sys.argv[1:]], prog_name="jobs/dynamics.py")
