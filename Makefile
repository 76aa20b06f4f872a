# Two commands on a fresh machine: `make demo` (main job on the embedded model) and `make test`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo lint test test-ends test-remote test-sae test-browser test-scale bench ndif-up ndif-down recipes clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch pulls gigabytes of CUDA packages on Linux.
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# A Superscopes readout of "Diana, Princess of Wales" at "Wales": MLP outputs and hidden
# states of layers 1-4, written back at the same layer, six alphas, judged by MiniLM.
demo: $(STAMP)
	$(BIN)/superscopes scope "Diana, Princess of Wales" --token Wales --sites mlp_out,resid_post \
		--layers 1-4 --alphas 1,3,6,9,12,15 --target-layer same --judge --out results/demo/wales.csv

# The written-down style: ruff's lint rules and format (pyproject.toml), pinned, checked not applied.
RUFF ?= ruff==0.17.6
lint: $(STAMP)
	$(BIN)/pip install --quiet "$(RUFF)"
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The default suite: tiny random models of 8 architectures plus the real SmolLM2.
test: $(STAMP)
	$(BIN)/python -m pytest -q

# The default suite on each end of the transformers range in pyproject.toml, each in its own venv
# (make test runs on the newest release the range allows).
TRANSFORMERS_ENDS ?= 5.24.0 5.25.0
test-ends:
	set -e; for v in $(TRANSFORMERS_ENDS); do \
		venv=.venv-transformers-$$v; \
		[ -x $$venv/bin/python ] || $(PYTHON) -m venv $$venv; \
		$$venv/bin/pip install --quiet "$(TORCH)"; \
		$$venv/bin/pip install --quiet -e ".[test]" "transformers==$$v"; \
		echo "transformers $$v"; $$venv/bin/python -m pytest -q; \
	done

# Against a real NDIF server on loopback: starts it (first time ~10 min to install), runs
# the remote tier, stops it. See scripts/ndif/README.md.
test-remote: $(STAMP)
	bash scripts/ndif/up.sh
	$(BIN)/python -m pytest -q -m ndif; status=$$?; bash scripts/ndif/down.sh; exit $$status

# superscopes' SAEs against SAELens itself: sae-lens (pinned) in its own venv writes SAEs of
# every kind with its save_model and encodes inputs; our loader must give the same encodes.
SAE_LENS ?= sae-lens==6.54.12
SAE_VENV := .venv-sae
SAE_STAMP := $(SAE_VENV)/.installed

$(SAE_STAMP):
	$(PYTHON) -m venv $(SAE_VENV)
	$(SAE_VENV)/bin/pip install --quiet --upgrade pip
	$(SAE_VENV)/bin/pip install --quiet "$(TORCH)"
	$(SAE_VENV)/bin/pip install --quiet "$(SAE_LENS)"
	touch $(SAE_STAMP)

test-sae: $(STAMP) $(SAE_STAMP)
	SUPERSCOPES_SAE_LENS_PYTHON=$(SAE_VENV)/bin/python $(BIN)/python -m pytest -q -s -m sae_lens tests/test_sae_saelens.py

# The web app in headless Chromium (installs Debian chromium + chromium-driver).
test-browser: $(STAMP)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)
	$(BIN)/pip install --quiet selenium
	SUPERSCOPES_APP_SCREENSHOT=$${SUPERSCOPES_APP_SCREENSHOT:-results/app.png} $(BIN)/python -m pytest -q -rs -m browser

# The 1.5B embedded model (qwen2.5-coder-1.5b, 7 GB in float32; fetched and converted on first use):
# every site of every layer against HF, and the grid's shared prefix against whole prompts.
test-scale: $(STAMP)
	$(BIN)/python -m pytest -q -m scale

# Every benchmark block, then the graph's shared prefix vs whole prompts vs hooks vs the compute floor.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run
	$(BIN)/python -m benchmarks.graph

ndif-up: $(STAMP)
	bash scripts/ndif/up.sh

ndif-down:
	bash scripts/ndif/down.sh

clean:
	rm -rf $(VENV) results
