# infercomp: `make demo` and `make test` each install what they need into .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
OUT    ?= out
DEMO_FLAGS ?= --min-time 0.5 --force

.PHONY: install demo test test-fast bench lint samples clean

# torch is pinned to the CPU build that lies on this machine's disk (any other pulls gigabytes);
# it is installed first so the package's own dependency resolution finds it satisfied.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	@echo "== int8 weight-only quantization of the digits CNN =="
	$(VENV)/bin/infercomp quantize sample_models/digits_cnn.safetensors -o $(OUT)/cnn_int8.safetensors --data sample_models/digits_test.safetensors $(DEMO_FLAGS)
	@echo "== 50% magnitude pruning of the digits MLP =="
	$(VENV)/bin/infercomp prune sample_models/digits_mlp.safetensors -o $(OUT)/mlp_pruned.safetensors --sparsity 0.5 --data sample_models/digits_test.safetensors $(DEMO_FLAGS)
	@echo "== report: all sample models side by side =="
	$(VENV)/bin/infercomp report sample_models/digits_cnn.safetensors $(OUT)/cnn_int8.safetensors --data sample_models/digits_test.safetensors --min-time 0.5

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) bench/run.py

lint: install
	$(PY) -m ruff check infercomp tests bench sample_models

# Retrain the sample models (seeded; about a minute on 2 cores).
samples: install
	$(PY) sample_models/train.py

clean:
	rm -rf $(OUT) .pytest_cache
