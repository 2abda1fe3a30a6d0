# Everyday verbs. Every target creates the virtualenv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.runtime-stamp
STAMP := $(VENV)/.installed-stamp

.PHONY: help run dev test test-fast soak check-deploy deploy-tools lint format lock audit bench bench-full bench-gpu bench-overload clean

# A venv whose interpreter is older than 3.11, or gone (the Python it was made with was
# upgraded or removed), is out of date whatever the requirements' times: made anew below.
VENV_PYTHON_OK := $(shell $(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && echo yes)

# What serving needs (`make run`, `make dev`).
$(RUNTIME_STAMP): requirements.txt constraints.txt $(if $(VENV_PYTHON_OK),,FORCE)
	@# A venv left by another interpreter, whose interpreter is gone, or without pip (venv
	@# failed in ensurepip) is made anew; a working one is installed into again as it is,
	@# whichever Python $(PYTHON) names now.
	@if ! { $(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' && \
		$(BIN)/python -m pip --version; } >/dev/null 2>&1; then \
		$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
			echo "this project needs Python 3.11 or newer, which $(PYTHON) is not: make PYTHON=python3.11 <target>" >&2; \
			exit 1; }; \
		rm -rf $(VENV); \
		echo "$(PYTHON) -m venv $(VENV)"; \
		$(PYTHON) -m venv $(VENV); \
	fi
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -c constraints.txt
	touch $(RUNTIME_STAMP)

# What testing, linting and benchmarking need beside it.
$(STAMP): $(RUNTIME_STAMP) requirements-dev.txt
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt -c constraints.txt
	touch $(STAMP)

FORCE:

## help: list these targets
help:
	@sed -n 's/^## //p' $(MAKEFILE_LIST)

## run: serve on 0.0.0.0:$PORT (5001) with gunicorn + uvicorn workers; settings from the environment
run: $(RUNTIME_STAMP)
	$(BIN)/gunicorn main:app -c gunicorn_config.py

## dev: auto-reloading development server on 127.0.0.1:$PORT (5001); BIND, WORKERS and
##   KEEPALIVE_S are gunicorn's, and do not apply
dev: $(RUNTIME_STAMP)
	$(BIN)/uvicorn main:app --reload --port $${PORT:-$${port:-5001}} --http service.protocol:JsonErrorsHttpProtocol --ws none

## test: the suite but soak and deployment checks (random weights, no network needed);
##   TESTS=tests/service/test_settings.py (files, ::names, -k ...) runs those alone
test: $(STAMP)
	$(BIN)/python -m pytest $(TESTS)

## test-fast: the suite without the tests that start server processes
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not soak and not deploy"

## soak: minutes of 10x overload against real gunicorn, watching memory (SOAK_S, default 300)
soak: $(STAMP)
	$(BIN)/python -m pytest -m soak -s tests/test_resilience.py

## check-deploy: compose schema, Prometheus config and a real scrape, Grafana queries,
##   Kubernetes manifests, two replicas behind a real nginx (needs `make deploy-tools`)
check-deploy: $(STAMP)
	$(BIN)/python -m pytest -m deploy tests/deploy

## deploy-tools: Debian's prometheus (with promtool) and nginx, for check-deploy (needs root)
deploy-tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null \
		&& command -v nginx >/dev/null \
		|| { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends prometheus nginx >/dev/null; }

## lint: ruff (lint + format check) and mypy
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## lock: after changing requirements*.txt, install them and write constraints.txt from the venv
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	{ sed -n '/^#/p' constraints.txt; $(BIN)/python -m pip freeze --all | grep -vE '^(pip|wheel)=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	touch $(RUNTIME_STAMP) $(STAMP)

## audit: look every pinned package (constraints.txt) up in the PyPI vulnerability database (needs network)
audit: $(STAMP)
	$(BIN)/pip-audit --no-deps --disable-pip --strict -r constraints.txt

## bench: quick end-to-end benchmark (two to four minutes); results in docs/benchmarks/
bench: $(STAMP)
	$(BIN)/python -m bench

## bench-full: the full sweep (several minutes)
bench-full: $(STAMP)
	$(BIN)/python -m bench --full

## bench-gpu: the GPU benchmark (float16 and bfloat16, batches up to 256, 4 and 8 workers on the GPU)
bench-gpu: $(STAMP)
	$(BIN)/python -m bench.gpu

## bench-overload: closed-loop overload with a 300 ms deadline (about 30 s); how much is answered
bench-overload: $(STAMP)
	$(BIN)/python -m bench.overload

## format: fix what ruff can, and format
format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## clean: remove the virtualenv and the tools' caches
clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
