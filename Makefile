# Every target reuses one virtual environment in .venv, created on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.uwe-installed

# The peers' benchmark environment: separate from .venv, never a dependency of uwe.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.peers-installed

.PHONY: venv test demo bench bench-env bench-peers lint clean ls-venv ls-template chromium integrations

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP) integrations
	UWE_REQUIRE_INTEGRATIONS=1 UWE_LS_VENV=$(CURDIR)/$(LS_VENV) UWE_LS_TEMPLATE=$(CURDIR)/$(LS_TEMPLATE) \
		$(PY) -m pytest -q

# Real programs the integration tests drive: a Label Studio server (own venv, migrated data-dir
# template cached beside it) and headless Chromium (Debian package; installed when missing, as root).
LS_VENV := .venv-ls
LS_TEMPLATE := .ls-template
LS_STAMP := $(LS_VENV)/.uwe-installed
LS_REQS := tests/integrations/label-studio-requirements.txt tests/integrations/label-studio-constraints.txt

integrations: ls-template chromium

ls-venv: $(LS_STAMP)

$(LS_STAMP): $(LS_REQS)
	rm -rf $(LS_VENV) $(LS_TEMPLATE)
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install --quiet --disable-pip-version-check \
		-r tests/integrations/label-studio-requirements.txt -c tests/integrations/label-studio-constraints.txt
	touch $(LS_STAMP)

ls-template: $(LS_TEMPLATE)/uwe-ls-credentials.json

$(LS_TEMPLATE)/uwe-ls-credentials.json: $(LS_STAMP)
	$(PYTHON) tests/integrations/ls_server.py init $(LS_VENV) $(LS_TEMPLATE)

chromium:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

lint: $(STAMP)
	$(VENV)/bin/ruff check uwe_cli tests benchmarks examples
	$(VENV)/bin/ruff format --check uwe_cli tests benchmarks examples

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash examples/demo.sh

bench: $(STAMP) $(BENCH_STAMP)
	$(PY) benchmarks/run.py

# About 3 minutes and 6 GB (torch from the local index; fpsample compiles C++; torch-fps builds its
# kernel on first use, cached in .venv-bench/torch_extensions).
bench-env: $(BENCH_STAMP)

$(BENCH_STAMP): benchmarks/peers-requirements.txt
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet -r benchmarks/peers-requirements.txt
	mkdir -p $(BENCH_VENV)/torch_extensions
	touch $(BENCH_STAMP)

bench-peers: $(STAMP) $(BENCH_STAMP)
	$(PY) benchmarks/peers.py

clean:
	rm -rf demo-out bench-out $(LS_TEMPLATE)
