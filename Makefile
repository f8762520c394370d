# One set-up command, one test command. PYTHON may point at a venv's interpreter.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torchvision pins its torch; this pair is the regular PyPI build and runs on the CPU.
TORCH_PAIR := torch==2.15.0 torchvision==0.29.2

.PHONY: setup setup-system test test-fast lint-layers integration bench quality demo clean

setup: setup-system
	$(PIP) install $(TORCH_PAIR)
	$(PIP) install -e ".[train,serve,qdrant,ray,dev]"

# Debian packages the tests drive for real: Redis and headless Chromium.
setup-system:
	@if command -v apt-get >/dev/null 2>&1 && { ! command -v redis-server >/dev/null || ! command -v chromium >/dev/null; }; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server chromium >/dev/null; \
	fi

# Everything: the layer contracts, then every test, real-data integration tests included
# (they need ../shared/data/fashion-products or $$VITRINE_DATA).
test: lint-layers
	$(PYTHON) -m pytest -q

# Unit tests only: tiny configs, no shared data.
test-fast: lint-layers
	$(PYTHON) -m pytest -q -m "not integration"

# search > trainer | indexer > vitrine, and no torch below the trainer (import-linter, pyproject.toml).
lint-layers:
	$(PYTHON) -c "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())" --no-logo

bench:
	$(PYTHON) bench/encode_speed.py --out bench/out

# The relevance table from scratch: every row of the cached-token recipe on 3 seeds (train, export, eval on test).
quality:
	$(PYTHON) bench/quality.py --epochs 10 --rows convsum,res,mp,itc,attr,hard --test-rows convsum,res --seeds 0,1,2 --out bench/out

clean:
	rm -rf build dist *.egg-info .pytest_cache
