# The two set-up commands (README): `make repro` runs the whole pipeline on the embedded default,
# `make test` runs the fast test suite. Both create .venv and install the project first.
PY ?= python3
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.prefect

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[dev]'
	touch $@

.PHONY: install repro pretrain test test-all serve bench check-lock exps node-client
install: $(VENV)/.installed

# A failed (or interrupted) `dvc repro` leaves the failed stage's outputs removed or half-written: put back
# what dvc.lock names (persist outputs excluded), and remove what killed commands left beside the outputs
# (pipelines/sweep.py). Then print what the run achieved (pipelines/summary.py:
# metrics, gate verdict, model and pack sizes, wall time per stage) and exit with dvc's status.
repro: install
	@start=$$(date +%s); rc=0; $(VENV)/bin/python -m pipelines.sweep; \
	$(VENV)/bin/dvc repro || { rc=$$?; $(VENV)/bin/python -m pipelines.restore; }; \
	$(VENV)/bin/python -m pipelines.sweep; \
	$(VENV)/bin/python -m pipelines.summary --since $$start --status $$rc; exit $$rc

# The embedded backbone, on purpose: the `pretrain` stage is frozen (its outputs are committed, so `make repro`
# never re-runs it); this runs its command and records the new outputs in dvc.lock. Then commit
# models/pretrain/ and dvc.lock. ~30 min on 2 idle cores with the default profile (docs/training.md).
pretrain: install
	$(VENV)/bin/dvc repro params && $(VENV)/bin/lpt pretrain && $(VENV)/bin/dvc commit -f pretrain

# dvc.lock must describe the committed code and params (CI runs this before the tests; missing outputs
# in a fresh clone are fine). No bytecode written: __pycache__ inside a dependency folder changes its hash.
check-lock: install
	PYTHONDONTWRITEBYTECODE=1 $(VENV)/bin/python -m pipelines.lock_check

test: install node-client
	$(VENV)/bin/python -m pytest

# The Node.js client (examples/node, tested by tests/test_rawpixels.py): Node.js from the distribution's packages
# where it is missing and apt is there, then its npm packages. Never fails the build: without them those tests
# skip, saying why.
node-client:
	@command -v node >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && apt-get install -y -qq nodejs npm) >/dev/null 2>&1; } || \
	  echo "note: Node.js is not installed; the Node client's tests will skip"
	@if command -v npm >/dev/null 2>&1 && [ ! -d examples/node/node_modules/onnxruntime-node ]; then \
	  (cd examples/node && npm install --no-audit --no-fund --loglevel=error) || \
	  echo "note: npm install failed; the Node client's tests will skip"; fi

test-all: install
	$(VENV)/bin/python -m pytest -m ''

serve: install
	$(VENV)/bin/lpt-serve start

bench: install
	$(VENV)/bin/python -m bench.all

# The experiments side by side in 80 columns: the params that differ and the test metrics compared first
# (`dvc exp show` alone prints every param, dependency hash and metric: hundreds of columns).
EXPS_DROP := Created|State|Executor|.*/.*|(top5|mean_per_class|num_samples|val_acc|trainable_params|backbone_params|trainable_share|prompt_params|prompt_share|gate_passed|.*_authors)$$
exps: install
	$(VENV)/bin/dvc exp show --no-pager --only-changed --drop '$(EXPS_DROP)' --precision 3
