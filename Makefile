# One command for each thing a user does. `make test` and `make serve` work from a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install browser test lint format serve bench demo-models clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch/torchvision pinned here (the project's range admits them) so pip takes the local wheels.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The web page tests drive Debian's chromium; they skip with the reason when it cannot be installed.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
		>/dev/null 2>&1; } || echo "chromium not installed: the web page tests will skip"

test: install browser
	$(PY) -m ruff check captioner api training tests bench
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check captioner api training tests bench
	$(PY) -m ruff format --check captioner api training tests bench

format: install
	$(PY) -m ruff format captioner api training tests bench

serve: install
	$(VENV)/bin/captioner serve --host $(HOST) --port $(PORT)

bench: install
	$(PY) bench/decode.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
