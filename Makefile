# `make test` and `make demo` set themselves up: .venv is (re)built whenever
# pyproject.toml is newer than the last install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo benchmark clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# earlier versions used DALI's CUDA 12 wheels, which share files with the CUDA 13 ones: remove both families
	if $(PY) -m pip show -q nvidia-dali-cuda120 2>/dev/null; then $(PY) -m pip uninstall -y -q nvidia-dali-cuda120 \
	  nvidia-nvimgcodec-cu12 nvidia-libnvcomp-cu12 nvidia-nvjpeg-cu12 nvidia-nvjpeg2k-cu12 nvidia-nvtiff-cu12 \
	  nvidia-dali-cuda130 nvidia-nvimgcodec-cu13 nvidia-libnvcomp-cu13 nvidia-nvjpeg nvidia-nvjpeg2k-cu13 nvidia-nvtiff-cu13; fi
	$(PY) -m pip install -e '.[test,bench]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh

benchmark: $(STAMP)
	$(PY) -m benchmarks.throughput

clean:
	rm -rf $(VENV) demo_run .pytest_cache
