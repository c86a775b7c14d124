# Set-up and entry points. `make demo` and `make test` each create .venv and install what they need.
# TORCH selects the torch requirement: the default is the CPU build that lies on this machine's disk;
# override it for another build, e.g. `make TORCH=torch test`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
EXTRAS ?= hf,onnx,test,train
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench zoo clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/geonorm-fx demo

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) benchmarks/run_all.py

zoo: install
	$(PY) benchmarks/zoo_sweep.py

clean:
	rm -rf $(VENV) build *.egg-info
