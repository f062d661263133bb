# make demo   - set up .venv (pinned deps, the package built in place) and run the main job
# make test   - set up .venv and run the whole test suite (what CI runs)
# make bench  - the pytest-benchmark suite at full size (batch 16 and 64, YOLOv3 at 416)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXT_SOURCES := $(shell find csrc python/src -name '*.cpp' -o -name '*.h' 2>/dev/null)

.PHONY: install demo test bench clean

$(STAMP): requirements-dev.txt pyproject.toml setup.py $(EXT_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m yolo_kernels.bench

test: $(STAMP)
	YK_BENCH_BATCHES=2 $(PY) -m pytest -q -p no:cacheprovider --benchmark-disable tests benchmarks

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-columns=median,iqr,rounds --benchmark-sort=name

clean:
	rm -rf $(VENV) build *.egg-info yolo_kernels/_C*.so
