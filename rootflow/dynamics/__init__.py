"""Root dynamics over a season: align each window across sessions, measure production and loss.

* ``align.py``: register a session's image onto the previous one's (rigid: dx, dy, angle),
  with a quality score and a flag for pairs that cannot be aligned; method registry.
* ``dynamics.py``: persisting / produced / lost root length and area between two aligned masks
  on the overlap, rates per day, root length density, cumulative sums.
* ``job.py``: the Ray Data job: traits table -> pairs grouped by window -> ``alignments`` and
  ``dynamics`` Delta tables (idempotent, incremental).
* ``_cli.py``: ``rootflow align`` and ``rootflow dynamics``.

Measured figures and the choice of method, threshold and k: ``docs/dynamics.md``.
"""
