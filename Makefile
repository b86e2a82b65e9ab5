# `make test` and `make demo` work on a fresh machine: both create .venv/ and install into it on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# QUICK=1 limits `make bench` to the small CPU shapes and a few memory-plan cases (minutes each on 2 cores).
QUICK ?= 0

.PHONY: install test demo bench lint clean

# setup.py declares ranges; constraints.txt holds the exact versions installed here.
$(STAMP): setup.py constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c constraints.txt -e '.[test,deepspeed,lint]'
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests bench

demo: $(STAMP)
	$(PY) -m dama.cli demo --output-dir outputs/demo

bench: $(STAMP)
	$(PY) -m bench.loss_head $(if $(filter 1,$(QUICK)),--quick,)
	$(PY) -m bench.end_to_end $(if $(filter 1,$(QUICK)),--quick,)
	$(PY) -m bench.memory_plan $(if $(filter 1,$(QUICK)),--quick,)

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) outputs .pytest_cache
