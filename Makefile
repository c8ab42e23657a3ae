# fastchgnet — two commands on a fresh machine: `make demo` and `make test`.
# Both create the virtual environment .venv when it is missing.
#
# torch is installed first and pinned to the CPU wheel on machines without an NVIDIA driver,
# so that pip never downloads the multi-GB CUDA build there. Set TORCH_SPEC to override.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
HAS_NVIDIA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
TORCH_SPEC ?= $(if $(HAS_NVIDIA),torch,torch==2.13.0)
PYTEST_ARGS ?=

.PHONY: demo test bench bench-check bench-baseline env clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	touch $@

env: $(VENV)/.installed

demo: env
	$(PY) -m fastchgnet demo

test: env
	$(PY) -m pytest tests -q $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# speed ratios against chgnet, saved as pytest-benchmark JSON (extra_info["ratio"] per case)
BENCH_JSON ?= .benchmarks/latest.json
BENCH_BASELINE ?= benchmarks/baseline.json
BENCH_PATHS ?= benchmarks
BENCH_ARGS ?=
# the benchmark-only peers (matgl's CHGNet), installed beside the test extra
$(VENV)/.bench-installed: $(VENV)/.installed
	$(PIP) install -q -e ".[test,peers]"
	touch $@

bench: env $(VENV)/.bench-installed
	mkdir -p $(dir $(BENCH_JSON))
	$(PY) -m pytest $(BENCH_PATHS) --benchmark-only -q --benchmark-json=$(BENCH_JSON) $(BENCH_ARGS)

# the regression gate: fails, naming the case, when a ratio fell more than the margin below
# benchmarks/baseline.json (run `make bench` first)
bench-check: env
	$(PY) -m fastchgnet.bench.gate check $(BENCH_JSON) --baseline $(BENCH_BASELINE)

# write benchmarks/baseline.json from the last `make bench` (commit it, with the machine it names)
bench-baseline: env
	$(PY) -m fastchgnet.bench.gate update $(BENCH_JSON) --baseline $(BENCH_BASELINE)

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks build *.egg-info
