# Two set-up commands that work on a fresh machine: `make demo` and `make test`.
# Each creates its own virtual environment. CI (`make test`) installs exactly the versions in
# constraints/: the lower bound (transformers 4.57 + optimum-onnx) and the upper bound (the newest
# transformers CI has proved, also pyproject's upper bound), so a green CI stays green.
# `make test-latest` runs the suite on the newest releases, without pins (README: "Dependency policy").
PYTHON ?= python3
TORCH  := torch==2.13.0
TF4    := .venv-tf4
TF5    := .venv-tf5
LATEST := .venv-latest

.PHONY: demo test test-tf4 test-tf5 test-latest venvs constraints clean

# transformers 4.57 with optimum's ONNX part (which pins transformers < 4.58)
$(TF4)/.ready: pyproject.toml constraints/tf4.txt
	$(PYTHON) -m venv $(TF4)
	$(TF4)/bin/pip install -q --upgrade pip
	$(TF4)/bin/pip install -q -c constraints/tf4.txt $(TORCH)
	$(TF4)/bin/pip install -q -c constraints/tf4.txt -e ".[dev,optimum]"
	touch $@

# the newest transformers 5.x CI has proved
$(TF5)/.ready: pyproject.toml constraints/tf5.txt
	$(PYTHON) -m venv $(TF5)
	$(TF5)/bin/pip install -q --upgrade pip
	$(TF5)/bin/pip install -q -c constraints/tf5.txt $(TORCH)
	$(TF5)/bin/pip install -q -c constraints/tf5.txt -e ".[dev,onnx]"
	touch $@

venvs: $(TF4)/.ready $(TF5)/.ready

demo: $(TF5)/.ready
	$(TF5)/bin/headslim shrink all-MiniLM-L6-v2 --prune 0.5 --calib bbc-news --out demo-out/slim --overwrite

test-tf4: $(TF4)/.ready
	$(TF4)/bin/python -m pytest -q --durations=15 tests

test-tf5: $(TF5)/.ready
	$(TF5)/bin/python -m pytest -q --durations=15 tests

test: test-tf4 test-tf5

# The newest releases of everything but torch (this machine's CPU build; a newer torch is a CUDA
# download of several GB), upgraded on every call, past pyproject's upper bound on transformers.
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q $(TORCH)
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -c constraints/torch-cpu.txt -e ".[dev,onnx]"
	$(LATEST)/bin/pip install -q --upgrade -c constraints/torch-cpu.txt transformers
	$(LATEST)/bin/python -c "import torch, transformers, onnxruntime; print('torch', torch.__version__, '| transformers', transformers.__version__, '| onnxruntime', onnxruntime.__version__)"
	$(LATEST)/bin/python -m pytest -q tests

# After a green test-latest: write its versions as the new upper-bound pins.
constraints:
	@echo "# Exact versions CI installs for the .venv-tf5 suite (pip install -c). Python 3.11, CPU torch." > constraints/tf5.txt
	@echo "# Regenerate after a green 'make test-latest': see README, \"Dependency policy\"." >> constraints/tf5.txt
	$(LATEST)/bin/pip freeze | grep -v '^-e\|^headslim' | sed 's/+cpu$$//' >> constraints/tf5.txt

clean:
	rm -rf $(TF4) $(TF5) $(LATEST) demo-out .pytest_cache
