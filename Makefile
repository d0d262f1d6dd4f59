# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast demo demo-clip data clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,clip,tensorboard]"
	touch $(STAMP)

install: $(STAMP)

data:
	bash tools/get_fashion_mnist.sh

test: install data
	$(PY) -m pytest -q tests

demo: install data
	$(PY) -m dino_sparo.cli.demo

demo-clip: install
	$(PY) -m dino_sparo.cli.demo --config configs/clip/scenes_sparo.yaml

clean:
	rm -rf $(VENV) *.egg-info
