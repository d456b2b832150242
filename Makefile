# make demo  -- set up .venv (first time) and run the built-in demo
# make test  -- set up .venv (first time) and run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	$(PY) -c "import torchvision, lpips, taming"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m train demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/bench_losses.py
	$(PY) benchmarks/bench_loader.py

clean:
	rm -rf $(VENV)
