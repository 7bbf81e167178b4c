# specfleet: `make demo` and `make test` are the two commands a fresh clone needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.specfleet-installed
TORCH_VERSION := 2.13.0
# checkov lives in a venv of its own: its dependencies clash with the project's, and `make test` never needs it
CHECKOV_VERSION := 3.3.30
CHECKOV_VENV := .checkov-venv

.PHONY: setup demo test lint models head acceptance card protos chart scan simulate bench bench-reliability bench-fuzz bench-autoscale soak gpu-check clean help

help:  ## list the targets
	@grep -E '^[a-z]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

# Re-runs only when pyproject.toml changes (or the venv is missing).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==$(TORCH_VERSION)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv and install specfleet with its dev tools

demo: setup  ## generate text with the bundled models
	$(VENV)/bin/specfleet demo

test: setup  ## lint and run the test suite
	$(PY) -m ruff check services operator kernels tests
	$(PY) -m pytest -q

lint: setup  ## ruff only
	$(PY) -m ruff check services operator kernels tests

models: setup  ## rebuild the model family from scratch or resume it (long: hours on a CPU)
	$(VENV)/bin/specfleet train all

head: setup  ## train or resume the draft head on the target's features (HEAD_MINUTES, default 60) -> models/head
	$(VENV)/bin/specfleet train head --minutes $(or $(HEAD_MINUTES),60)

acceptance: setup  ## re-measure the drafter x domain acceptance matrix and rewrite models/README.md
	$(VENV)/bin/specfleet models acceptance

chart: setup  ## validate the Helm chart and Dockerfiles (helm lint, Kubernetes schemas, values schema, yamllint, hadolint)
	$(PY) -m pytest -q tests/deploy

$(CHECKOV_VENV)/bin/checkov:
	@test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install -q --disable-pip-version-check checkov==$(CHECKOV_VERSION)

scan: setup $(CHECKOV_VENV)/bin/checkov  ## policy scan (checkov) of the rendered chart and the operator's manifests -> bench/policy-scan.json
	$(PY) -m tests.deploy.policy_scan --checkov $(CHECKOV_VENV)/bin/checkov --output bench/policy-scan.json

simulate: setup  ## compare CoSine, SpecInfer, PipeInfer, DSI and plain decoding at 10-1,000 replicas -> bench/simulate.json + PNGs
	$(VENV)/bin/specfleet simulate

bench: setup  ## the fleet benchmark: round overhead, throughput vs the engine, the CoSine ablation -> bench/fleet.json
	$(VENV)/bin/specfleet bench fleet --output bench/fleet.json

bench-reliability: setup  ## kill -9 / SIGSTOP mid-stream, alone and under 200 streams, API fuzz, 200-stream load -> bench/reliability.json
	$(VENV)/bin/specfleet bench reliability --under-load --output bench/reliability.json

bench-fuzz: setup  ## 10,000 malformed / extreme gRPC and HTTP inputs against the fleet -> bench/reliability.json "fuzz"
	$(VENV)/bin/specfleet bench fuzz --count 10000 --output bench/reliability.json

SOAK_SECONDS ?= 1800
SOAK_STREAMS ?= 200
soak: setup  ## long load (SOAK_SECONDS, SOAK_STREAMS) with every service's RSS sampled: growth + slope -> bench/reliability-soak.json
	$(PY) -m specfleet.bench.soak --seconds $(SOAK_SECONDS) --streams $(SOAK_STREAMS) --output bench/reliability-soak.json

bench-autoscale: setup  ## a load ramp and a burst on specfleet up --autoscale -> bench/autoscale.json + .png
	$(VENV)/bin/specfleet bench autoscale --output bench/autoscale.json

gpu-check: setup  ## on a CUDA machine (< 8 min): CUDA/Triton kernel tests, bf16 parity vs HF on CUDA, engine table -> bench/gpu.json
	$(VENV)/bin/specfleet bench gpu

protos: setup  ## regenerate the gRPC stubs in services/specfleet/api/v1/ from protos/
	$(PY) services/specfleet/api/codegen.py

clean:  ## remove the venv and caches (keeps data/ checkpoints)
	rm -rf $(VENV) $(CHECKOV_VENV) .pytest_cache .ruff_cache
