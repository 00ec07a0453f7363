# Two commands do all set-up: `make demo` and `make test`. Each creates .venv if missing and
# installs everything from scratch; a second run finds the stamp and installs nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.rootflow-installed
PIP    := $(PY) -m pip install --progress-bar off -c constraints.txt
export ROOTFLOW_REAL_DATA ?= $(abspath ../shared/data/real)

.PHONY: install browser demo test test-fast lint typecheck bench clean

install: $(STAMP) browser

# The browser the studio's test drives: Debian's chromium (Playwright never downloads one).
# As root on Debian (CI) it is installed with apt when missing; elsewhere a note is printed and
# the browser test skips (it fails instead under CI=true).
browser:
	@if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q chromium chromium-driver || \
	  { apt-get update -q && apt-get install -y -q chromium chromium-driver; }; \
	else echo "note: chromium is missing and this is not root on Debian: the studio browser" \
	  "test will skip (run: sudo apt-get install -y chromium chromium-driver)"; fi

# torch + torchvision first (PyPI builds, run on CPU), then sam2 without build isolation and
# without its CUDA extension (its setup.py imports torch; isolation would fetch a second
# torch), then rootflow itself with the dev extra.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --progress-bar off -q --upgrade "pip>=24" "setuptools>=69" wheel
	$(PIP) torch torchvision
	SAM2_BUILD_CUDA=0 $(PIP) --no-build-isolation sam2
	$(PIP) -e '.[dev]'
	$(PY) -c "import torch, torchvision, sam2, ray, deltalake, timm; print('rootflow env ok: torch', torch.__version__, 'ray', ray.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rootflow demo --out demo-output

test: $(STAMP) browser
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check rootflow tests jobs benchmarks notebooks

typecheck: $(STAMP)
	$(VENV)/bin/mypy rootflow

clean:
	rm -rf $(VENV) demo-output .pytest_cache
