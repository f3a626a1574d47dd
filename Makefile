# graphopt developer entry points. The two commands of the README's first section:
#   make demo   set up .venv, compile a sample model through a real pipeline on ONNX Runtime, run it
#   make test   set up .venv, run the test suite
#
# The set-up pins the CPU build of torch (an unpinned `torch` pulls a multi-GB CUDA build);
# GPU machines: `make setup TORCH_SPEC="torch>=2.11"` or install your CUDA torch first.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.graphopt-installed
BENCH_ARGS ?=

.PHONY: setup demo test test-full lint bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/graphopt compile samples/models/nanogpt.py:build --pipeline cleanup --target onnx --out build/nanogpt
	$(BIN)/graphopt run build/nanogpt

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist worksteal --durations=15

# everything: the default run plus the heavy integration runs and the matrices (about an hour)
test-full: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist worksteal -m "heavy or matrix or not heavy" --durations=25

# Side-by-side benchmarks (README "Benchmarks"): results in bench/results/<case>.{md,json,png}
# onnxruntime-genai is a peer of the scale case only, never a dependency of graphopt: installed here,
# and a failed install just leaves its systems skipped.
bench: $(STAMP)
	@$(BIN)/python -c "import onnxruntime_genai" 2>/dev/null || $(BIN)/python -m pip install -q onnxruntime-genai \
		|| echo "onnxruntime-genai not installed: the scale case skips its systems"
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check graphopt plugins samples tests bench

clean:
	rm -rf build .pytest_cache .hypothesis
