# Two entry points for a new user: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned here (not in pyproject.toml) to the build known to work with timm/torchvision on CPU.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

# hipt view's page needs OpenSeadragon from the npm registry, installed into a git-ignored
# heatmaps/viewer/node_modules/ (versions in heatmaps/viewer/package.json and its lock file).
OSD := heatmaps/viewer/node_modules/openseadragon/package.json

.PHONY: setup demo test lint bench clean

$(BIN)/hipt: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/hipt

$(OSD): heatmaps/viewer/package.json heatmaps/viewer/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		npm install --prefix heatmaps/viewer --no-audit --no-fund --loglevel=error && touch $@; \
	else \
		echo "warning: npm not found; hipt view needs OpenSeadragon (install Node.js and npm, then make setup)" >&2; \
	fi

setup: $(BIN)/hipt $(OSD)

demo: setup
	$(BIN)/hipt demo --out demo_out

test: setup
	$(BIN)/python -m pytest -n 2 -q tests

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf demo_out .pytest_cache
