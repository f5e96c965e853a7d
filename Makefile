# imaging-exchange: the two commands a new machine needs are `make run` and `make test`.
# Both create .venv in the checkout and install the project when it is missing (`make setup`);
# `make test` also installs the system packages the tests use (as root, when missing).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Debian packages the test suite drives: dcmtk (real DICOM peers), PostgreSQL (index tests),
# dicom3tools (dciodvfy checks de-identified objects against their IOD), Orthanc (the peer the
# interoperability tests and benchmarks use), chromium and fonts-noto-cjk (the viewer's browser
# tests drive Debian's headless Chromium through Playwright; Chinese labels need the CJK fonts).

.PHONY: setup run test system-deps lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "imx needs Python 3.11 or newer")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

run: setup
	$(BIN)/imx serve

system-deps:
	@missing=""; \
	command -v storescu >/dev/null 2>&1 || missing="$$missing dcmtk"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v dciodvfy >/dev/null 2>&1 || missing="$$missing dicom3tools"; \
	command -v Orthanc >/dev/null 2>&1 || missing="$$missing orthanc"; \
	test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so || missing="$$missing orthanc-dicomweb"; \
	test -x /usr/bin/chromium || missing="$$missing chromium"; \
	test -e /usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc || missing="$$missing fonts-noto-cjk"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "run as root, or install:$$missing" >&2; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# The tests start what they need (a PostgreSQL cluster, moto's S3 server, imx serve) on loopback
# and stop it when they end.
test: setup system-deps
	TCP_NODELAY=1 $(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .

# system-deps brings Orthanc and its DICOMweb plugin, the peers every benchmark compares with
bench: setup system-deps
	TCP_NODELAY=1 $(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) .pytest_cache
