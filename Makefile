# Two set-up commands that work on a fresh machine: `make demo` and `make test`.
# Each creates its own virtual environment; torch is pinned to the CPU build 2.13.0.
PYTHON ?= python3
TORCH  := torch==2.13.0
TF4    := .venv-tf4
TF5    := .venv-tf5

.PHONY: demo test test-tf4 test-tf5 venvs clean

# transformers 4.57 with optimum's ONNX part (which pins transformers < 4.58)
$(TF4)/.ready: pyproject.toml
	$(PYTHON) -m venv $(TF4)
	$(TF4)/bin/pip install -q --upgrade pip
	$(TF4)/bin/pip install -q $(TORCH)
	$(TF4)/bin/pip install -q -e ".[dev,optimum]" "transformers>=4.57,<4.58"
	touch $@

# the latest transformers 5.x
$(TF5)/.ready: pyproject.toml
	$(PYTHON) -m venv $(TF5)
	$(TF5)/bin/pip install -q --upgrade pip
	$(TF5)/bin/pip install -q $(TORCH)
	$(TF5)/bin/pip install -q -e ".[dev,onnx]" "transformers>=5,<6"
	touch $@

venvs: $(TF4)/.ready $(TF5)/.ready

demo: $(TF5)/.ready
	$(TF5)/bin/headslim shrink all-MiniLM-L6-v2 --prune 0.5 --calib bbc-news --out demo-out/slim --overwrite

test-tf4: $(TF4)/.ready
	$(TF4)/bin/python -m pytest -q tests

test-tf5: $(TF5)/.ready
	$(TF5)/bin/python -m pytest -q tests

test: test-tf4 test-tf5

clean:
	rm -rf $(TF4) $(TF5) demo-out .pytest_cache
