# Everything installs itself idempotently: a fresh clone needs only `make run` or `make test`.
SHELL := /bin/bash
VENV := .venv
TORCH_VERSION := 2.11.0
# Bump the stamp's suffix when the package list changes, so existing venvs pick it up.
TORCH_STAMP := $(VENV)/.deps-torch-$(TORCH_VERSION)-2
# torch-sys finds libtorch through the venv's python (see build.rs and .cargo/config.toml).
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export VIRTUAL_ENV := $(CURDIR)/$(VENV)
export LIBTORCH_USE_PYTORCH := 1

BIN := target/release/xsrec
ML100K := data/ml-100k/ml-100k.inter
DEFAULT_MODEL := models/default
# The documented recipe of the default model (see README "The default model"). It was trained
# with length-grouped batches, `xsrec train`'s default until shuffled batches proved better.
DEFAULT_TRAIN_FLAGS := --max-len 50 --seed 42 --threads 1 --readouts off --positions window-start --batching grouped

.PHONY: venv build data data-1m run test fmt lint bench load quality quality-1m cross-session fuzz api-fuzz monitoring image clean

venv: $(TORCH_STAMP)

$(TORCH_STAMP):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check torch==$(TORCH_VERSION) numpy pytest
	touch $@

build: venv
	cargo build --release

FETCH_ML100K = $(BIN) data fetch movielens-100k --out data
data: build
	$(FETCH_ML100K)

data-1m: build
	$(BIN) data fetch movielens-1m --out data

# The main job: serve the committed default model (trained first if it is missing), keeping
# histories durably in state/ (git-ignored) so a restart forgets nobody.
STATE_DIR := state
run: build $(DEFAULT_MODEL)/model.safetensors
	$(BIN) serve --model $(DEFAULT_MODEL) --data-dir $(STATE_DIR) --fsync interval

$(DEFAULT_MODEL)/model.safetensors:
	$(MAKE) data
	$(BIN) train --data $(ML100K) --out $(DEFAULT_MODEL) $(DEFAULT_TRAIN_FLAGS)

fmt:
	cargo fmt --all

lint: venv
	cargo fmt --all -- --check
	cargo clippy --release --all-targets --features failpoints -- -D warnings

# The serving tests replay ml-100k histories through the default model, hence the fetch, done
# with the binary the test build leaves in target/release (with fail points, which stay inert
# unless a test configures them): `make data`'s build without them would compile the crate a
# second time, 5 of the 20 minutes `make test` may take here.
# One libtorch thread per test process: with a core taken by anything else, two spinning OpenMP
# threads made the training test 40x slower (590 s instead of 14 s, measured); alone it costs little.
test: lint
	OMP_NUM_THREADS=1 cargo test --release --features failpoints --no-run
	$(FETCH_ML100K)
	OMP_NUM_THREADS=1 cargo test --release --features failpoints
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest -q models/torch/tests

bench: venv
	cargo bench

load: build
	scripts/load.sh $(DEFAULT_MODEL)

quality: data
	scripts/quality.sh
	.venv/bin/python scripts/quality_table.py runs/quality

# MovieLens-1M (hours on 2 cores; interrupt and rerun to continue, see the script).
quality-1m: data-1m
	scripts/quality_1m.sh
	MAIN=full .venv/bin/python scripts/quality_table.py runs/quality-1m
	MAIN=full EVAL=eval-unmasked.json .venv/bin/python scripts/quality_table.py runs/quality-1m

# docker/'s alert rules (promtool unit tests) and Grafana queries against a real Prometheus
# scraping a live server (installs Debian's prometheus package when missing). Uses the binary in
# target/release as it is (after `make test` in CI: the test build's), building one only if
# there is none.
monitoring: venv
	scripts/monitoring.sh

# The synthetic cross-session family of docs/QUALITY.md (about an hour on 2 cores).
cross-session: build
	scripts/cross_session.sh
	python3 scripts/cross_session_table.py runs/cross-session

clean:
	cargo clean
	rm -rf runs

# The CPU container image, built with podman and smoke-tested (docker/build.sh; FLAVOR=cuda too).
image:
	docker/build.sh

# Coverage-guided fuzzing (cargo-fuzz, nightly) of request decoding through the real router and of
# journal record decoding; FUZZ_SECONDS per target. No sanitizer (-s none): libtorch is not built
# for one; panics and aborts are what is caught. The targets need libtorch on the loader path.
FUZZ_SECONDS ?= 20
# Schemathesis over the OpenAPI document against a running server with keys and a store.
api-fuzz: build
	scripts/api_fuzz.sh $(FUZZ_SECONDS)

TORCH_LIB = $(shell $(VENV)/bin/python -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
fuzz: venv
	command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	cd fuzz && for target in journal_record request_decoding; do \
	  LD_LIBRARY_PATH=$(TORCH_LIB) cargo +nightly fuzz run -s none -O $$target -- -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done
