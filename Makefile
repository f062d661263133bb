# make demo   - set up .venv (pinned deps, the package built in place) and run the main job
# make test   - set up .venv, lint (ruff check + format --check) and run the whole test suite (what CI runs)
# make lint   - ruff check and ruff format --check only
# make bench  - the pytest-benchmark suite at full size (batch 1, 16 and 64, YOLOv3 at 416)
# make sanitize - the C++ tests against an ASan + UBSan build, then the normal build again

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXT_SOURCES := $(shell find csrc python/src -name '*.cpp' -o -name '*.h' 2>/dev/null)

.PHONY: install demo lint test bench sanitize clean

$(STAMP): requirements-dev.txt requirements-ultralytics.txt pyproject.toml setup.py $(EXT_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-ultralytics.txt
	YOLO_KERNELS_REQUIRE_EXT=1 $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m yolo_kernels.bench

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: $(STAMP) lint
	YK_BENCH_BATCHES=2 $(PY) -m pytest -q -p no:cacheprovider --benchmark-disable tests benchmarks

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-columns=median,iqr,rounds --benchmark-sort=name

SANITIZER_RUNTIMES = $$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)
sanitize: $(STAMP)
	YOLO_KERNELS_REQUIRE_EXT=1 YOLO_KERNELS_SANITIZE=1 $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	LD_PRELOAD="$(SANITIZER_RUNTIMES)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 TRITON_INTERPRET=0 \
	  $(PY) -m pytest -q -p no:cacheprovider tests/test_cpp.py tests/test_fused_loss.py tests/test_robustness.py tests/test_properties.py \
	  tests/test_yolov5.py tests/test_stats.py tests/test_anchor_free_ops.py tests/test_families.py \
	  -k "not triton"; status=$$?; \
	YOLO_KERNELS_REQUIRE_EXT=1 $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .; exit $$status

clean:
	rm -rf $(VENV) build *.egg-info yolo_kernels/_C*.so
