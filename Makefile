# medlens: the two commands are `make run` and `make test`; both do all the set-up.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medlens-installed
export MEDLENS_DATA ?= $(abspath ../shared/data)
RUN_CONFIG ?= configs/pneumoniamnist_cnn.yaml

.PHONY: run test install browser system-deps viewer bench clean

install: $(STAMP)

# torch first (a CPU build), then everything else with torch pinned by constraints.txt,
# so no dependency can pull a newer, CUDA-sized torch from the registry. --no-compile: pip would byte-compile every
# module of every package (torch, sympy, scipy...) at install; Python compiles the ones a process imports, once, on
# first import. Measured here on a fresh venv, busy machine: 141 s of install against 79 s.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile torch==2.13.0
	$(PY) -m pip install -q --no-compile -c constraints.txt -e ".[test]"
	@touch $(STAMP)

# Headless Chromium renders report.html and runs the viewer of `medlens serve` in the tests (Debian's package;
# the serve tests drive it with playwright from the test extra, pointed at /usr/bin/chromium: no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium missing: install Debian's 'chromium' package for the browser tests"; fi; }

# The PACS round trip and the DICOM validator of the interop tests (Debian's packages): a real Orthanc with its
# DICOMweb plugin, and dciodvfy from dicom3tools.
system-deps:
	@{ command -v Orthanc && test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so && command -v dciodvfy; } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb dicom3tools >/dev/null; \
	  else echo "orthanc, orthanc-dicomweb or dicom3tools missing: install those Debian packages for the interop tests"; fi; }

# The viewer's NiiVue build (BSD-2-Clause; see src/medlens/serve/static/NIIVUE_LICENSE.txt) is fetched from the
# npm registry at set-up and checked against its sha256, rather than kept in git.
NIIVUE := src/medlens/serve/static/niivue.umd.js
NIIVUE_SHA256 := 47b896b77ec4a5be3ef1949c33ad393b6f45629921f326c279000bcf51bdb4af
viewer: $(NIIVUE)
$(NIIVUE):
	@command -v npm >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null; \
	  else echo "npm missing: install Node.js and npm to fetch the viewer's NiiVue build"; exit 1; fi; }
	@tmp=$$(mktemp -d) && (cd $$tmp && npm pack --silent @niivue/niivue@0.69.0 >/dev/null && \
	  tar -xzf niivue-niivue-0.69.0.tgz package/dist/niivue.umd.js) && \
	  echo "$(NIIVUE_SHA256)  $$tmp/package/dist/niivue.umd.js" | sha256sum -c --quiet && \
	  mv $$tmp/package/dist/niivue.umd.js $(NIIVUE).part && mv $(NIIVUE).part $(NIIVUE); rc=$$?; rm -rf $$tmp; exit $$rc

run: $(STAMP) viewer
	$(VENV)/bin/medlens train $(RUN_CONFIG) --overwrite

# The import contracts (pyproject's [tool.importlinter]) and ruff first: an upward import, an in-function import
# outside medlens/cli or an undefined name fails the suite. Then pytest on both cores (pytest-xdist, one module's
# tests on one worker), with pyright (basic) beside it: pyright takes about a minute of one core, and pytest leaves
# part of the two idle while its tests wait on servers and subprocesses (a fresh-clone make test used 1507 s of CPU
# in 1060 s). A third worker was measured slower (1091 s of pytest against 960 s). A type error fails the suite as
# before; pyright's verdict is printed after pytest's.
test: $(STAMP) browser system-deps viewer
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check --quiet src tests tools benchmarks
	@$(VENV)/bin/pyright > $(VENV)/pyright.log 2>&1 & pyright=$$!; \
	$(PY) -m pytest -q -ra --durations=25 -n 2 --dist loadscope --no-loadscope-reorder; tests=$$?; \
	wait $$pyright; types=$$?; echo "pyright:"; cat $(VENV)/pyright.log; \
	test $$tests = 0 && test $$types = 0

bench: $(STAMP)
	$(PY) benchmarks/medmnist.py

clean:
	rm -rf $(VENV) runs .pytest_cache
