# Two entry points for a fresh machine with only python3 (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/local_stage1_sim

.PHONY: venv demo test

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# Main job: train DualTrack local stage 1 on simulated sweeps, then evaluate it.
demo: venv
	$(PY) -m launch.train --config=configs/dualtrack/local_stage1.py:sim --workdir=$(WORKDIR)
	$(PY) -m launch.evaluate --workdir=$(WORKDIR)

# Two test processes, whole files each (module fixtures are built once): XLA compiles on one
# core, so the second core otherwise idles.
test: venv
	$(PY) -m pytest -q -n 2 --dist loadfile
