# Two commands on a fresh clone: `make demo` and `make test`.  Each creates and
# fills .venv when it is missing or older than the files that define it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# On these machines a bare `torch` requirement makes pip fetch a multi-GB CUDA
# build; the CPU wheel of this exact release lies on disk.  Override for other
# machines: `make test TORCH_SPEC='torch>=2.1'`.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

export MPLBACKEND := agg
export PYTHONHASHSEED := 0
# the build test (tests/test_build.py) installs the wheel next to the same torch
export TORCH_SPEC

.PHONY: demo test docs bench clean chromium

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]" "$(TORCH_SPEC)"
	# mup (test extra) requires torchvision but never imports it; PyPI's torchvision is built for the
	# CUDA torch and fails at import beside a CPU wheel, which breaks libraries that probe for it
	$(PY) -c "import torchvision" 2>/dev/null || $(PY) -m pip uninstall -y -q torchvision
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/signalprop demo --out demo-out

# The HTML reports' browser tests (tests/test_html_browser.py) drive headless Chromium.  Installed
# with apt when missing and this is root on a Debian-like system; otherwise those tests say why they skip.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ; } || \
	  echo "note: no Chromium (not root, or no apt-get): the browser tests will skip"

test: $(STAMP) chromium
	$(PY) -m ruff check src tests benchmarks tools
	$(PY) -m mypy
	$(PY) -m pytest -q

# the site, into site/ (warnings are errors); the tutorials run once, on this venv's Python.  make test builds it
# too (tests/test_docs.py).  NO_MKDOCS_2_WARNING: Material's banner about MkDocs' future, not about these docs
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]" "$(TORCH_SPEC)"
	$(PY) benchmarks/run_all.py --out benchmarks/results

clean:
	rm -rf $(VENV) demo-out benchmarks/results .pytest_cache site
