# The two commands: `make run` and `make test`. Both set up everything on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Debian packages the tests talk to (real peers, 127.0.0.1 only); nginx: https in front of Orthanc.
PEERS  := dcmtk dicom3tools orthanc orthanc-dicomweb prometheus openssl nginx-light
PEER_BINARIES := storescu echoscu dciodvfy dsrdump Orthanc prometheus promtool openssl nginx
PEER_FILES := /usr/share/orthanc/plugins/libOrthancDicomWeb.so
# scale-out peers (tests/peers/test_scaleout.py, tests/node/index/test_migrations.py): Celery broker, PostgreSQL index
PEERS  += redis-server postgresql
PEER_BINARIES += redis-server
PEER_FILES += /usr/lib/postgresql
# what the radiologist sees (tests/peers/test_ohif_display.py): OHIF in Debian's headless chromium
PEERS  += chromium
PEER_BINARIES += chromium

# OHIF's prebuilt viewer (`@ohif/app` ships its dist/), unpacked outside git for the browser test
OHIF_VERSION := 3.13.2
OHIF_DIR := .cache/ohif/$(OHIF_VERSION)

# `helm lint` for deploy/helm/nodal (tests/peers/test_deploy.py): no helm binary comes from the package
# registries here, so the Helm library itself (helm-sdkpy: Helm's Go code as a shared library).
# Its wheel asks for Python 3.12 but is pure Python over the library; it works on 3.11, so it
# goes into a folder of its own, apart from the project's dependencies.
HELM_LIB := $(VENV)/helm-sdkpy

.PHONY: run test lint peers install train evaluate bench clean chart-tools ohif

# The node with the embedded defaults (conf/node.yaml): DIMSE on 11112, HTTP (API, STOW-RS) on
# 8080, data in var/. `$(BIN)/nodal demo` still analyses one generated phantom offline.
run: $(STAMP)
	$(BIN)/nodal serve

# The walls between the rooms and the node's layers (import contracts in pyproject.toml), then
# the type checker, then the tests: a crossed wall fails `make test` before any test runs.
test: $(STAMP) peers chart-tools ohif
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/pytest -q

install: $(STAMP)

# torch first and pinned: the CPU build of 2.13.0 is what `pip install torch==2.13.0`
# finds on these machines; anything else would pull the CUDA wheels.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

peers:
	@missing=""; for b in $(PEER_BINARIES); do command -v $$b >/dev/null || test -x /usr/sbin/$$b || missing=1; done; \
	for f in $(PEER_FILES); do test -e $$f || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing test peers: $(PEERS)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(PEERS) >/dev/null; \
	fi

ohif: $(OHIF_DIR)/dist/index.html

# npm from Debian only where there is none: a Node.js from elsewhere brings its own, and
# Debian's npm package conflicts with it.
$(OHIF_DIR)/dist/index.html: | peers
	@command -v npm >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq nodejs npm >/dev/null; }
	mkdir -p $(OHIF_DIR)
	cd $(OHIF_DIR) && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null \
	  && tar xzf ohif-app-$(OHIF_VERSION).tgz --strip-components=1 package/dist \
	  && rm ohif-app-$(OHIF_VERSION).tgz

chart-tools: $(HELM_LIB)/helm_sdkpy

$(HELM_LIB)/helm_sdkpy: | $(STAMP)
	$(BIN)/pip install --quiet --ignore-requires-python --target $(HELM_LIB) helm-sdkpy==0.1.32

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

# The recorded commands behind the shipped demo weights and benchmarks/RESULTS.md. Each
# version is trained on from the one before (docs/training.md): 0.1.0 from random weights on
# phantoms 0-79; 0.2.0 on phantoms 80-159 with more patches on node-like tissue; 0.3.0 on
# phantoms 160-223 with patches on 0.2.0's own false positives; 0.4.0 (segmenter only) on
# phantoms 224-287 with patches on 0.3.0's false positives; then the candidate verifier and
# the plausibility rules (inference/plausibility.py) written into the card; 0.4.2: the
# checker (a CNN on each candidate's crops, fitted on 240 training phantoms; about 70 min on
# 2 cores) set to judge every candidate alone, without the verifier (benchmarks/RESULTS.md,
# 2026-12-06); 0.4.10: 0.4.2 with the plausibility rule tube_inplane off too; 0.4.11: 0.4.10
# with its malignancy classifier trained on the plain and domain-randomised phantoms 288-383.
MODEL := inference/models/nodal-ln-demo
train: $(STAMP)
	$(BIN)/nodal train --out $(MODEL) --cases 80 --seg-steps 2000 --cls-epochs 25 --verifier-cases 0
	$(BIN)/nodal train --out $(MODEL) --init-from $(MODEL) --seed 80 --cases 80 --seg-steps 2500 \
	  --seg-lr 1e-3 --hard-share 0.45 --node-share 0.35 --cls-epochs 10 --version 0.2.0 --verifier-cases 0
	$(BIN)/nodal train --out $(MODEL) --init-from $(MODEL) --seed 160 --cases 64 --seg-steps 2000 \
	  --seg-lr 5e-4 --node-share 0.35 --hard-share 0.2 --mined-share 0.3 --cls-epochs 10 --version 0.3.0 \
	  --verifier-cases 0
	$(BIN)/nodal train --out $(MODEL) --init-from $(MODEL) --seed 224 --cases 64 --seg-steps 2000 \
	  --seg-lr 5e-4 --node-share 0.35 --hard-share 0.2 --mined-share 0.3 --cls-epochs 0 --version 0.4.0 \
	  --verifier-cases 0
	$(BIN)/nodal train-verifier --model-dir $(MODEL) --cases 32 --keep-share 0.97
	$(BIN)/nodal plausibility --model-dir $(MODEL) --off tube_path
	$(BIN)/nodal train-checker --model-dir $(MODEL) --cases 120 --keep-share 0.995 --epochs 8
	$(BIN)/nodal checker --model-dir $(MODEL) --threshold 0.5 --without-verifier --version 0.4.2
	$(BIN)/nodal plausibility --model-dir $(MODEL) --off tube_path tube_inplane
	$(BIN)/nodal checker --model-dir $(MODEL) --threshold 0.5 --without-verifier --version 0.4.10
	rm -rf var/train/0.4.10 && mkdir -p var/train && cp -r $(MODEL) var/train/0.4.10
	$(BIN)/nodal train --out $(MODEL) --init-from $(MODEL) --seed 288 --cases 96 --seg-steps 0 \
	  --cls-epochs 10 --mixed --version 0.4.11 --verifier-cases 0
	$(BIN)/nodal plausibility --model-dir $(MODEL) --off tube_path tube_inplane
	$(BIN)/nodal checker --model-dir $(MODEL) --from var/train/0.4.10 --threshold 0.5 --without-verifier \
	  --version 0.4.11

# Both phantom families side by side: `train` (the training generator, unseen seeds) and
# `heldout` (an independent generator never used for training or fitting).
evaluate: $(STAMP)
	$(BIN)/nodal evaluate --family both --cases 20 --json

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) var .cache .pytest_cache .ruff_cache
