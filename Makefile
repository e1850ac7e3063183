# Two commands: `make demo` and `make test`. Both create .venv when it is missing and install kiln into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REPO ?= models

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-runtimes install clean browser lint

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

# Lint and type gates first (seconds), then the suite.
lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/python -m mypy

# The suite (under 10 minutes on 2 cores), then the optional runtimes' tests (OpenVINO, ExecuTorch, TVM tuning,
# ONNX import, MindSpore when KILN_MINDSPORE_PYTHON names a python with it), a few minutes more.
test: $(STAMP) browser lint
	$(BIN)/python -m pytest -q -m "not runtimes"
	$(MAKE) --no-print-directory test-runtimes

test-runtimes: $(STAMP)
	$(BIN)/python -m pytest -q -m runtimes

clean:
	rm -rf $(VENV) models .pytest_cache
