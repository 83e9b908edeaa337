# Two entry points for a fresh machine (see README):
#   make demo   install into .venv and run the offline demo end to end
#   make test   install into .venv with dev tools and the team extras (Dask, Redis locks), run ruff and the
#               test suite (the team tests start PostgreSQL and redis-server: .ci/run installs them)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A prebuilt CPU wheel of llama-cpp-python saves a 15-20 minute compile; used only when present.
FIND_LINKS := $(if $(wildcard ../shared/wheels/*.whl),--find-links ../shared/wheels,)
# The pinned CPU build of torch comes first: an unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: install install-dev demo test lint
install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q $(FIND_LINKS) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q $(FIND_LINKS) -e '.[dev,team]'
	touch $@

demo: install
	$(VENV)/bin/zhllama demo

lint: install-dev
	$(VENV)/bin/ruff check .

test: install-dev lint
	$(VENV)/bin/pytest -q
