"""What a person watching a run sees on a terminal."""

from __future__ import annotations

import io
import re
import sys

import pytest

from rootflow.lake import Lake
from tests.pipeline._helpers import check_commit_lines

pytestmark = pytest.mark.ray


class _Terminal(io.StringIO):
    """Stands in for the user's terminal (``isatty``); the job under test is real."""

    def isatty(self) -> bool:
        return True


#: The live line (rewritten in place with ``\r``): done/total, percent, rate, elapsed, left.
LIVE = re.compile(r"\r(\d+)/(\d+) images \((\d+)%\), ([\d.]+) images/s, elapsed [\d:]+, "
                  r"left ([\d:]+|\?)")


def test_demo_shows_images_done_rate_and_time_left_on_a_terminal(ray_local, tmp_path,
                                                                 monkeypatch) -> None:
    """Guards against the demo (and the job under `rootflow infer`/`reprocess`, which share
    ``run``'s progress) showing nothing a person can follow on a terminal: a live line of
    images done of total, rate and time left, ending at the total, and one line per commit;
    and against Ray Data's own per-operator bars coming back over it."""
    from rootflow.demo import run_demo

    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    result = run_demo(str(tmp_path / "demo"), n_images=3, models=False)
    monkeypatch.undo()
    text = term.getvalue()
    live = LIVE.findall(text)
    assert live, text[-2000:]
    done = [int(d) for d, *_ in live]
    total = {int(t) for _, t, *_ in live}
    lake = Lake(str(tmp_path / "demo" / "lake"))
    n = lake.read("traits").num_rows + (lake.read("rejects").num_rows
                                         if lake.exists("rejects") else 0)
    assert total == {n} and done == sorted(done) and done[-1] == n, live
    # the demo answers with the job's exit code (0 all done, 3 done with rejects)
    n_rejected = result["run"]["n_images_rejected"]
    assert result["exit_code"] == (3 if n_rejected else 0)
    assert live[-1][4] == "0:00"
    check_commit_lines(text, images=n, rows=n, commits=1, min_lines=1)
    # Ray Data's bars would print operator names (MapBatches(...)) and tqdm's "it/s".
    assert "MapBatches" not in text and "it/s" not in text and "row/s" not in text
