# `make test` and `make demo` work on a fresh machine: both create .venv/ and install into it on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# QUICK=1 limits `make bench` to the small CPU shapes and a few memory-plan cases (minutes each on 2 cores).
QUICK ?= 0

# The lower end of the supported transformers range (setup.py): `make test-transformers-min` runs the trainer,
# checkpoint and resume tests against it, in a second venv with the same install but that transformers.
TRANSFORMERS_MIN := 5.17.0
VENV_MIN := .venv-min
MIN_STAMP := $(VENV_MIN)/.installed-stamp
MIN_TESTS := tests/test_trainer.py tests/test_train_robustness.py tests/test_training_options.py tests/test_lora.py \
	tests/test_recipes.py tests/test_distributed_loss.py

.PHONY: install test test-transformers-min demo bench lint clean

# setup.py declares ranges; constraints.txt holds the exact versions installed here.
$(STAMP): setup.py constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c constraints.txt -e '.[test,deepspeed,lint]'
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests bench

# Any pins of constraints.txt hold here too, its transformers pin aside.
$(MIN_STAMP): setup.py $(wildcard constraints.txt)
	@test -x $(VENV_MIN)/bin/python || $(PYTHON) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/python -m pip install -q --upgrade pip
	@if [ -f constraints.txt ]; then grep -iv '^transformers' constraints.txt; fi > $(VENV_MIN)/constraints.txt
	DS_BUILD_OPS=0 $(VENV_MIN)/bin/python -m pip install -q -c $(VENV_MIN)/constraints.txt -e '.[test,deepspeed]' \
		'transformers==$(TRANSFORMERS_MIN)'
	@touch $(MIN_STAMP)

test-transformers-min: $(MIN_STAMP)
	$(VENV_MIN)/bin/python -m pytest -q $(MIN_TESTS)

demo: $(STAMP)
	$(PY) -m dama.cli demo --output-dir outputs/demo

bench: $(STAMP)
	$(PY) -m bench.loss_head $(if $(filter 1,$(QUICK)),--quick,)
	$(PY) -m bench.end_to_end $(if $(filter 1,$(QUICK)),--quick,)
	$(PY) -m bench.memory_plan $(if $(filter 1,$(QUICK)),--quick,)

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) $(VENV_MIN) outputs .pytest_cache
