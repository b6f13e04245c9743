# Each job of .ci/run, runnable alone from the repository root. The test targets use
# the venv the README's commands create (.venv, palfast installed in it); `lint` makes
# its own small venv and needs no build.
#
#   make lint          ruff check, ruff format --check, the import layers (.importlinter)
#   make test-fast     the tests not marked slow (the edit-test loop)
#   make test          every test (the README's test command, without the install)
#   make test-numeric  the numeric tests again under a second CPU capability (.ci/run, job 1a)
#   make wheels        the CPU wheel into dist/ (tools/build_wheels.sh; `cuda` needs a CUDA torch)
#   make gpu-dry-run   tools/gpu_session.sh --dry-run: the GPU session's steps on the CPU

VENV ?= .venv
LINT_VENV := build/lint-venv
# Pinned: another ruff version formats differently and would fail `format --check`.
RUFF_VERSION := 0.17.6
IMPORT_LINTER_VERSION := 2.17

.PHONY: lint test-fast test test-numeric wheels gpu-dry-run

$(LINT_VENV)/bin/ruff:
	python3 -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/pip install -q ruff==$(RUFF_VERSION) import-linter==$(IMPORT_LINTER_VERSION)

lint: $(LINT_VENV)/bin/ruff
	$(LINT_VENV)/bin/ruff check .
	$(LINT_VENV)/bin/ruff format --check .
	# import-linter reads the sources statically: palfast/ must only be findable.
	PYTHONPATH=$(CURDIR) $(LINT_VENV)/bin/lint-imports

test-fast:
	$(VENV)/bin/pytest -q -m "not slow"

test:
	$(VENV)/bin/pytest

test-numeric:
	bash tools/numeric_second_cpu.sh $(VENV)

wheels:
	PALFAST_CPU_PYTHON=$(VENV)/bin/python bash tools/build_wheels.sh cpu

gpu-dry-run:
	bash -c '. $(VENV)/bin/activate && bash tools/gpu_session.sh --dry-run'
