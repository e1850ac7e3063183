# Two commands: `make demo` and `make test`. Both create .venv when it is missing and install kiln into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REPO ?= models

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-runtimes install clean browser lint perf-analyzer

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the project's requirements change. torch==2.13.0 resolves to the local CPU wheel.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,ray,grpc,encoder,openvino,executorch,tvm]'
	$(BIN)/python -m pip install -q --no-deps 'onnx2torch>=1.5'
	touch $(STAMP)

install: $(STAMP)

# Build the digits model, then serve it and send it real requests.
demo: $(STAMP)
	$(BIN)/kiln build examples/digits/model.py:DigitsNet --weights examples/digits/digits.safetensors \
		--data examples/digits/test.npz --calib examples/digits/calib.npz --repo $(REPO)
	$(BIN)/python examples/digits/serve_demo.py --repo $(REPO)

# The report's test renders it in a real browser: Debian's chromium (no browser download from a test tool).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
		echo "installing Debian's chromium for the HTML report test"; \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# Triton's load generator, for the test that runs it against kiln (it skips, saying why, when this could not install).
# The binary ships only in the tritonclient 2.41 wheel; it links Debian's libb64 and the CUDA runtime library (from
# PyPI, 9 MB; nothing runs on a GPU). .venv/bin/perf_analyzer is a wrapper that finds that library.
PA_HOME := $(VENV)/perf_analyzer
perf-analyzer: | $(BIN)/python
	@[ -x $(BIN)/perf_analyzer ] || { \
		{ ldconfig -p | grep -q libb64.so.0d || { $(SUDO) apt-get update -qq && \
			$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libb64-0d >/dev/null; }; } && \
		rm -rf $(PA_HOME) && mkdir -p $(PA_HOME)/wheel && \
		$(BIN)/python -m pip download -q --no-deps -d $(PA_HOME)/wheel tritonclient==2.41.0 && \
		$(BIN)/python -m pip install -q --no-deps --target $(PA_HOME)/cudart nvidia-cuda-runtime-cu12 && \
		$(BIN)/python -c "import zipfile,glob,sys; z=zipfile.ZipFile(glob.glob(sys.argv[1]+'/wheel/*.whl')[0]); \
			open(sys.argv[1]+'/perf_analyzer','wb').write(z.read('tritonclient-2.41.0.data/data/bin/perf_analyzer'))" $(PA_HOME) && \
		rm -rf $(PA_HOME)/wheel && chmod +x $(PA_HOME)/perf_analyzer && \
		printf '#!/bin/sh\nhere=$$(dirname "$$(readlink -f "$$0")")/../perf_analyzer\nLD_LIBRARY_PATH="$$here/cudart/nvidia/cuda_runtime/lib$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH}" exec "$$here/perf_analyzer" "$$@"\n' > $(BIN)/perf_analyzer && \
		chmod +x $(BIN)/perf_analyzer && $(BIN)/perf_analyzer --version >/dev/null 2>&1; \
	} || { rm -f $(BIN)/perf_analyzer; echo "perf_analyzer not installed (its test will skip)"; }

# Lint and type gates first (seconds), then the suite.
lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/python -m mypy

# The suite on two pytest-xdist workers (each file's tests in one worker, every Ray test in the same one:
# tests/conftest.py), then the optional runtimes' tests (OpenVINO, ExecuTorch, TVM tuning, ONNX import, MindSpore when
# KILN_MINDSPORE_PYTHON names a python with it) in a process of their own: ExecuTorch's runtime crashed (SIGSEGV) in
# a process that had run the rest of the suite first, and passes alone. A worker that crashes ends the run at once and
# names its test (--max-worker-restart=0): a replaced worker can hang pytest-xdist's loadgroup scheduler for good.
# On 2 cores with a warm Inductor cache: 302 s, then 44 s (6 minutes for `make test` with the venv in place).
test: $(STAMP) browser perf-analyzer lint
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --max-worker-restart=0 -m "not runtimes"
	$(MAKE) --no-print-directory test-runtimes

test-runtimes: $(STAMP)
	$(BIN)/python -m pytest -q -m runtimes

clean:
	rm -rf $(VENV) models .pytest_cache
