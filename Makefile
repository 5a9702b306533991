# imagegen: one Makefile for setup, build, run and test. `make run` and `make test` work on a
# fresh clone: each installs what is missing first.
SHELL := /bin/bash
PY_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
SITE = $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
DATA_DIR ?= .data
MODEL_DIR ?= $(DATA_DIR)/models
PROTOS := $(wildcard protos/imagegen/v1/*.proto)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: install proto models run demo test lint fmt bench bench-deps determinism clean

## install: virtualenv with every dependency; torch first, pinned to the CPU wheel.
install: $(VENV)/.installed
$(VENV)/.installed: requirements/*.txt
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PIP) install -q -c requirements/constraints.txt torch==2.13.0
	$(PIP) install -q -c requirements/constraints.txt -r requirements/base.txt -r requirements/moderation.txt -r requirements/ml.txt -r requirements/dev.txt
	touch $@

## proto: generate Python code and .pyi stubs from protos/ into gen/ (never committed).
proto: gen/.built
gen/.built: $(PROTOS) $(VENV)/.installed
	rm -rf gen && mkdir -p gen
	$(PY) -m grpc_tools.protoc -I protos \
		--python_out=gen --grpc_python_out=gen \
		--mypy_out=gen --mypy_grpc_out=gen \
		--plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy \
		--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
		$(PROTOS)
	touch gen/imagegen/__init__.py gen/imagegen/v1/__init__.py gen/imagegen/py.typed
	printf '%s\n%s\n' "$(CURDIR)/gen" "$(CURDIR)" > $(SITE)/imagegen-dev.pth
	touch $@

## models: tiny pipelines with seeded random weights, for tests, demos and the embedded default.
models: $(MODEL_DIR)/.built
$(MODEL_DIR)/.built: services/generator/tiny_models.py services/evaluator/tiny_models.py $(VENV)/.installed
	$(PY) -m services.generator.tiny_models --out $(MODEL_DIR)
	$(PY) -m services.evaluator.tiny_models --out $(MODEL_DIR)
	touch $@

## run: embedded Postgres + Redis + local object store, the four services, HTTP on :8080.
run: proto models
	$(PY) -m services.mesh

## demo: submit a job to the running mesh and print its SSE stream.
demo:
	$(PY) -m services.demo

## determinism: same request, same PNG bytes: twice, across processes, across a generator
## restart, variant i vs seed+i, alone vs batched. Exits non-zero on any mismatch.
determinism: proto models
	$(PY) -m services.generator.determinism

## test: everything the CI runs.
test: proto models
	$(PY) -m pytest

## lint: ruff, mypy --strict, buf lint.
lint: proto
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	npx --yes @bufbuild/buf@1.75.0 lint protos

fmt: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

## bench: benchmarks under bench/ (writes bench/RESULTS.md).
bench: proto models bench-deps
	$(PY) -m bench

## bench-deps: .venv-bench, where the engine benchmark's Ray Serve peer runs (its own virtualenv:
## ray[serve] brings packages that would change what the services' virtualenv runs).
bench-deps: .venv-bench/.installed
.venv-bench/.installed: requirements/bench.txt requirements/ml.txt
	test -x .venv-bench/bin/python || $(PY_SYS) -m venv .venv-bench
	.venv-bench/bin/pip install -q -c requirements/constraints.txt torch==2.13.0
	.venv-bench/bin/pip install -q -c requirements/constraints.txt -r requirements/bench.txt
	touch $@

clean:
	rm -rf gen $(DATA_DIR) .pytest_cache .mypy_cache
