# kiln: `make demo` runs the whole job on the packaged default; `make test` runs the tests.
# Every target sets up its environment first (ci/bootstrap.sh), so both work on a fresh machine.
SPEC ?= minilm
VENV ?= .venv
KILN := $(VENV)/bin/kiln
STAMP := $(VENV)/.kiln-installed
# The repo root must never be on sys.path: triton/ would shadow the `triton` package torch imports.
export PYTHONSAFEPATH := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test export repo serve bench engines loadtest tune deploy unit functional e2e faults clean setup

setup: $(STAMP)

$(STAMP): pyproject.toml ci/bootstrap.sh
	VENV=$(VENV) bash ci/bootstrap.sh
	touch $(STAMP)

# both packaged models in one Triton: similarity matrix, streamed chat answer, then both again
# through the OpenAI-compatible gateway with curl
DEMO_SPECS ?= minilm smollm2
demo: $(STAMP)
	$(KILN) demo $(DEMO_SPECS)

export: $(STAMP)
	$(KILN) export $(SPEC)

repo: $(STAMP)
	$(KILN) repo $(SPEC)

# Triton (8000 HTTP, 8001 gRPC, 8002 metrics) + the OpenAI-compatible gateway (9000); Ctrl-C stops both
SERVE_SPECS ?= minilm smollm2
serve: $(STAMP)
	$(KILN) serve $(SERVE_SPECS)

bench: $(STAMP)
	$(KILN) bench $(SPEC)

engines: $(STAMP)
	$(KILN) engines $(SPEC)

# headless Locust run against a Triton it starts (or URL=host:port); exits 1 on a missed SLO
loadtest: $(STAMP)
	$(KILN) loadtest $(SPEC) $(if $(URL),--url $(URL))

# the batching / instance settings with the most load within an SLO (SLO=file), written as a spec
SLO ?= ci/slo-$(SPEC).yaml
BUDGET ?= 600
tune: $(STAMP)
	$(KILN) tune $(SPEC) --slo $(SLO) --budget $(BUDGET)

# Kubernetes (TARGET=k8s) or KServe (TARGET=kserve) manifests in build/<name>/deploy/, validated offline
TARGET ?= k8s
deploy: $(STAMP)
	$(KILN) deploy $(SPEC) --target $(TARGET)

test: $(STAMP)
	$(VENV)/bin/pytest

unit: $(STAMP)
	$(VENV)/bin/pytest tests/unit

functional: $(STAMP)
	$(VENV)/bin/pytest tests/functional

e2e: $(STAMP)
	$(VENV)/bin/pytest tests/e2e

# the fault suite on tiny models (hostile bodies, overload, Triton killed, generation loop killed):
# one table and build/faults/faults.json; exits 1 on a hard failure (STRICT=1: on a missed threshold too)
faults: $(STAMP)
	$(KILN) faults $(if $(STRICT),--strict)

clean:
	rm -rf build

# llama.cpp baseline for `make bench SPEC=smollm2` (optional extra `llama`): llama-cpp-python
# built from source as a plain AVX2 build (several minutes on 2 cores); not part of `make test`.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
.PHONY: llama-cpp
llama-cpp: $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(VENV)/bin/python -m pip install "llama-cpp-python[server]>=0.3"
