# kubetune developer entry points. Everything a target needs is installed by the target itself:
# a virtualenv in .venv (pip cache reused), Go-built binaries cached under ~/.cache/kubetune/bin.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# .venv installs the hashed lock requirements/dev.txt (make lock writes it from pyproject.toml).
#   make venv VARIANT=cpu    the same lock without triton and the cuda-* bindings (1 GB less;
#                            only GPU code paths load them; requirements/variant.awk)
#   make venv LOCKED=0       pyproject.toml's ranges instead, e.g. with a CPU-only torch index:
#                            PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
VARIANT ?= cuda
LOCKED ?= 1
PIP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: help venv lock images binaries cluster-up cluster-down cluster-status lint test demo crds chart bench

help:
	@echo "make demo          local cluster + S3, the chart, and the quickstart FineTuneJob end to end"
	@echo "make test          lint, type-check and run the whole test suite"
	@echo "make cluster-up    start the local control plane, process node and S3 server"
	@echo "make cluster-down  stop them and forget their state"
	@echo "make bench         CPU benchmarks (start-up, S3, operator scale, trainer) -> docs/benchmarks/"
	@echo "make crds          regenerate crds/kubetune.dev_finetunejobs.yaml from the pydantic models"
	@echo "make lock          regenerate the hashed dependency locks requirements/*.txt"
	@echo "make images        build the operator, trainer and API server images (BASE=local VARIANT=cpu REGISTRY=...)"

$(VENV)/.installed: pyproject.toml requirements/dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
ifeq ($(LOCKED),1)
	awk -v variant=$(VARIANT) -f requirements/variant.awk requirements/dev.txt > $(VENV)/lock.txt
	$(PY) -m pip install --quiet $(PIP_ARGS) --require-hashes \
		$(if $(filter cpu,$(VARIANT)),--no-deps) -r $(VENV)/lock.txt
	$(PY) -m pip install --quiet --no-deps -e .
else
	$(PY) -m pip install --quiet $(PIP_ARGS) -e '.[operator,trainer,dev]'
endif
	@touch $@

venv: $(VENV)/.installed

# One hashed lock per install set, all from pyproject.toml's ranges: requirements/dev.txt (.venv:
# every extra), operator.txt, trainer.txt and api.txt (the images), the image locks constrained
# to the dev lock's pins so the images run what the tests ran. Universal (Python 3.11-3.13, any
# platform: the CUDA image has Python 3.12), one version per package where possible. Existing
# pins are kept unless the ranges force a change; to update: make lock LOCK_ARGS=--upgrade (or
# LOCK_ARGS="--upgrade-package transformers").
LOCK_ARGS ?=
UV_COMPILE = $(VENV)/bin/uv pip compile pyproject.toml --universal --python-version 3.11 \
	--fork-strategy fewest --generate-hashes --quiet $(LOCK_ARGS)
lock: venv
	$(UV_COMPILE) --all-extras -o requirements/dev.txt
	$(UV_COMPILE) --extra operator -c requirements/dev.txt -o requirements/operator.txt
	$(UV_COMPILE) --extra trainer -c requirements/dev.txt -o requirements/trainer.txt
	$(UV_COMPILE) --extra api -c requirements/dev.txt -o requirements/api.txt

# The operator, trainer and API server images, tagged with the chart's appVersion (docs/images.md):
#   make images                              public bases, the CUDA trainer
#   make images BASE=local VARIANT=cpu       FROM a local Debian base (no registry needed), CPU trainer
#   make images REGISTRY=registry.example.com/ml    also tag REGISTRY/{operator,trainer,api} and push
#   make images IMAGES=api                   only some of them
images:
	VARIANT=$(VARIANT) bash images/build.sh

binaries:
	bash tests/localenv/build-binaries.sh

cluster-up: venv
	$(PY) tests/localenv/cluster.py up

cluster-down:
	@if [ -x $(PY) ]; then $(PY) tests/localenv/cluster.py down; else python3 tests/localenv/cluster.py down; fi

cluster-status:
	$(PY) tests/localenv/cluster.py status

# The FineTuneJob CRD is generated from trainer_image/kubetune_trainer/api.py; commit the result.
crds: venv
	$(PY) -m kubetune_operator.crd crds/kubetune.dev_finetunejobs.yaml

# The chart's CRD template, values.schema.json and values table come from crds/ and values.yaml.
chart: venv
	$(PY) charts/generate.py

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint cluster-up
	$(PY) -m pytest $(PYTEST_ARGS)

# The quickstart end to end: S3 assets, chart, examples/quickstart.yaml, live progress, results.
demo: cluster-up
	$(PY) examples/quickstart/demo.py

# The CPU benchmarks, each side by side with its baseline, at the sizes the published figures
# use; JSON + PNG go to $(BENCH_OUT) (docs/benchmarks/ by default, explained in
# docs/benchmarks.md; `make bench BENCH_OUT=/tmp/bench` leaves the published ones alone).
# About 13 minutes on a 2-core VM, most of it the classic recipe's padded training and the
# operator's 2 x 1,000 FineTuneJobs, plus DPO against TRL's DPOTrainer (a few minutes on an idle
# VM), and data_scale.py's 10k / 100k / 1M chat records in memory and streamed (about 25
# minutes more, most of it the in-memory path at 1M). The GPU benchmark
# (benchmarks/gpu_throughput.py) runs on a GPU machine, and so does
# benchmarks/dpo_throughput.py with larger sizes (docs/dpo.md).
BENCH_OUT ?= docs/benchmarks
bench: cluster-up
	@set -e; mkdir -p $(BENCH_OUT); start=$$SECONDS; \
	for step in "startup.py" "s3_pull.py --reps 2" "operator_scale.py" "crd_admission.py" "api_request_cost.py" "trainer_throughput.py" \
		"dpo_throughput.py" "data_scale.py"; do \
		script=$${step%% *}; t0=$$SECONDS; \
		$(PY) benchmarks/$$step --out $(BENCH_OUT)/$${script%.py}.json; \
		echo "make bench: $$script took $$((SECONDS - t0)) s"; \
	done; \
	echo "make bench: all seven took $$((SECONDS - start)) s; results in $(BENCH_OUT)/"
