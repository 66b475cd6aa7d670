# The front door: `make demo` runs the main job (the Prefect retrain flow) on the embedded default,
# `make test` the tests.
# Both create the virtual environment first (torch 2.13.0 before the project, so pip pulls no CUDA build).
VENV ?= .venv
PY := $(VENV)/bin/python
RLSC := $(VENV)/bin/rlsc
EXTRAS ?= pipeline,bench,dev

export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export DO_NOT_TRACK = true
export TOKENIZERS_PARALLELISM = false
export MLFLOW_DISABLE_TELEMETRY = true
export DVC_NO_ANALYTICS = 1
export PREFECT_SERVER_ANALYTICS_ENABLED = false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS = 60
export PREFECT_HOME ?= $(CURDIR)/outputs/.prefect

.PHONY: install demo test lint clean retrain serve repro prefect-server mlflow-ui bench-speed bench-profile bench-kernel bench-quality bench-collapse

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

# Prefect only creates the last folder of PREFECT_HOME: make the whole path first
install: $(VENV)/.installed-$(EXTRAS)
	@mkdir -p "$(PREFECT_HOME)"

demo: install               ## the main job: the retrain flow on the embedded default (same as `make retrain`)
	$(PY) -m flows.retrain --config params.yaml

test: install
	$(PY) -m pytest -q

retrain: install            ## one run of the Prefect retrain flow (local ephemeral API unless PREFECT_API_URL)
	$(PY) -m flows.retrain --config params.yaml

serve: install              ## the retrain flow on a schedule (Mondays 03:00)
	$(PY) -m flows.retrain --serve --cron "0 3 * * 1"

repro: install              ## the same stages through DVC
	$(VENV)/bin/dvc repro

prefect-server: install     ## Prefect API + UI on http://127.0.0.1:4200 (then export PREFECT_API_URL=http://127.0.0.1:4200/api)
	$(VENV)/bin/prefect server start --host 127.0.0.1 --port 4200

mlflow-ui: install          ## MLflow UI on http://127.0.0.1:5000 over the local store
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 --workers 1 \
		--backend-store-uri sqlite:///$(CURDIR)/outputs/mlflow/mlflow.db --default-artifact-root $(CURDIR)/outputs/mlflow/artifacts

# Benchmarks (not in CI: tens of minutes on 2 cores; tiny-model smoke versions run in `make test`).
# Results land in bench/results/ and bench/collapse/; bench/RESULTS.md records the measured runs.
bench-speed: install        ## rlsc vs TRL GRPOTrainer, one step = 1 question x 16 samples x 128 tokens
	$(PY) -m bench.speed $(BENCH_ARGS)

bench-profile: install      ## where an rlsc step's time goes (torch.profiler), per phase and kind of work
	$(PY) -m bench.profile $(BENCH_ARGS)

bench-kernel: install       ## the decode kernel vs torch's matmul on the model's layer shapes, by rows per call
	$(PY) -m bench.kernel $(BENCH_ARGS)

bench-quality: install      ## base vs RLSC arms on generated + GSM8K held-out sets, with controls
	$(PY) -m bench.quality --arms rlsc-l2,rlsc-l1,rlsc-l2-token-mean,entropy $(BENCH_ARGS)

bench-collapse: install     ## the collapse guard on the measured collapse case (full FT lr 1e-5) and LoRA
	RLSC=$(RLSC) PY=$(PY) bench/collapse/run.sh

lint: install
	$(VENV)/bin/ruff check rlsc tests bench flows

clean:
	rm -rf outputs .pytest_cache
