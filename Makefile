# The two set-up commands of the README. Both work on a fresh machine: they create
# .venv if it is missing, install featx into it, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.featx-installed
# torch and torchvision are pinned here (not in setup.cfg) to the releases this
# project is tested with.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.cfg setup.py
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(VENV)/bin/pytest -q tests

clean:
	rm -rf out .pytest_cache
