# Everything installs itself idempotently: a fresh clone needs only `make run` or `make test`.
SHELL := /bin/bash
VENV := .venv
TORCH_VERSION := 2.11.0
TORCH_STAMP := $(VENV)/.torch-$(TORCH_VERSION)
# torch-sys finds libtorch through the venv's python (see build.rs and .cargo/config.toml).
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export VIRTUAL_ENV := $(CURDIR)/$(VENV)
export LIBTORCH_USE_PYTORCH := 1

BIN := target/release/xsrec
ML100K := data/ml-100k/ml-100k.inter
DEFAULT_MODEL := models/default
# The documented recipe of the default model (see README "The default model").
DEFAULT_TRAIN_FLAGS := --max-len 200 --seed 42

.PHONY: venv build data run test fmt lint bench clean

venv: $(TORCH_STAMP)

$(TORCH_STAMP):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check torch==$(TORCH_VERSION) numpy
	touch $@

build: venv
	cargo build --release

data: build
	$(BIN) data fetch movielens-100k --out data

# Until the serving issue lands, the main job is: fetch ml-100k, train and evaluate the default model.
run: data
	$(BIN) train --data $(ML100K) --out runs/default $(DEFAULT_TRAIN_FLAGS)
	$(BIN) eval --model runs/default --data $(ML100K) --predictions-out runs/default/predictions.tsv --json-out runs/default/eval.json

fmt:
	cargo fmt --all

lint: venv
	cargo fmt --all -- --check
	cargo clippy --release --all-targets -- -D warnings

test: lint
	cargo test --release

bench: venv
	cargo bench

clean:
	cargo clean
	rm -rf runs
