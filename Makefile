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

.PHONY: install proto models run demo test lint fmt bench bench-deps determinism clean vendor

## install: virtualenv with every dependency; torch first, pinned to the CPU wheel.
install: $(VENV)/.installed
$(VENV)/.installed: requirements/*.txt
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PIP) install -q -c requirements/constraints.txt torch==2.13.0
	$(PIP) install -q -c requirements/constraints.txt -r requirements/base.txt -r requirements/moderation.txt -r requirements/ml.txt -r requirements/dev.txt
	touch $@

## proto: generate Python code and .pyi stubs from protos/ into sdk/imagegen/v1, the package
## `imagegen.v1` of the SDK (never committed). Generated aside, then moved into place, so that
## a process starting meanwhile finds the old code or the new, never half of it. The .pth puts
## sdk/ (the `imagegen` package) and the repository root (`services`) on the venv's path.
PROTO_OUT := sdk/imagegen/v1
proto: $(PROTO_OUT)/.built
$(PROTO_OUT)/.built: $(PROTOS) $(VENV)/.installed
	rm -rf sdk/.proto-build && mkdir -p sdk/.proto-build
	$(PY) -m grpc_tools.protoc -I protos \
		--python_out=sdk/.proto-build --grpc_python_out=sdk/.proto-build \
		--mypy_out=sdk/.proto-build --mypy_grpc_out=sdk/.proto-build \
		--plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy \
		--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
		$(PROTOS)
	touch sdk/.proto-build/imagegen/v1/__init__.py sdk/.proto-build/imagegen/v1/.built
	rm -rf $(PROTO_OUT).old && if [ -d $(PROTO_OUT) ]; then mv $(PROTO_OUT) $(PROTO_OUT).old; fi
	mv sdk/.proto-build/imagegen/v1 $(PROTO_OUT)
	rm -rf $(PROTO_OUT).old sdk/.proto-build
	printf '%s\n%s\n' "$(CURDIR)/sdk" "$(CURDIR)" > $(SITE)/imagegen-dev.pth
	rm -rf gen  # where the code was generated before the SDK took the `imagegen` name

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

## vendor: the charting library the admin page draws with (Chart.js, MIT), at the version
## web/package-lock.json pins, from npm into services/gateway/static/vendor/chart.js-VERSION/
## (committed: the gateway serves it, no CDN at run time). Needs node and npm; `make run` does not.
VENDOR_DIR := services/gateway/static/vendor
vendor:
	cd web && npm ci --ignore-scripts --no-audit --no-fund
	@set -e; \
	version=$$(node -p 'require("./web/node_modules/chart.js/package.json").version'); \
	integrity=$$(node -p 'require("./web/package-lock.json").packages["node_modules/chart.js"].integrity'); \
	target=$(VENDOR_DIR)/chart.js-$$version; \
	rm -rf $(VENDOR_DIR)/chart.js-*; mkdir -p $$target; \
	cp web/node_modules/chart.js/dist/chart.umd.min.js web/node_modules/chart.js/LICENSE.md $$target/; \
	cp web/node_modules/@kurkle/color/LICENSE.md $$target/LICENSE-kurkle-color.md; \
	printf '%s\n' "chart.js $$version from the npm registry ($$integrity): dist/chart.umd.min.js," \
		"which bundles @kurkle/color (MIT, LICENSE-kurkle-color.md). Refreshed by make vendor." > $$target/SOURCE; \
	sed -i -E "s#vendor/chart\.js-[0-9][^/]*/#vendor/chart.js-$$version/#" services/gateway/static/admin.html; \
	echo "vendored chart.js $$version into $$target"

clean:
	rm -rf gen $(PROTO_OUT) $(DATA_DIR) .pytest_cache .mypy_cache
