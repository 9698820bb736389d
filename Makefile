# Everything a fresh machine needs: `make demo` runs the main job, `make test` the test suite.
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0   # the CPU build; a bare `torch` pulls CUDA
	$(BIN)/python -m pip install -q -e ".[test,notebooks,interop,xarray,s3,gpu]"
	$(BIN)/python -m pip install -q --no-deps circuit-tracer==0.5.0   # its frontend models validate our graph JSON; it pins transformers<=4.57
	touch $(STAMP)

.PHONY: install demo test
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/microscope demo

test: $(STAMP)   # one process per core, each test file in one of them (module fixtures run once)
	$(BIN)/python -m pytest -q -n auto --dist loadfile
