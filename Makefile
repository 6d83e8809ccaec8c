# `make demo` and `make test` set everything up: a .venv/ in the repo root with torch installed first
# (a CPU build here; override TORCH for another, e.g. make test TORCH="torch==2.13.0 --index-url URL").

PYTHON ?= $(shell command -v python3.11 || command -v python3)
TORCH  ?= torch==2.13.0
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export WANDB_DIR ?= $(CURDIR)/.wandb
export WANDB_CACHE_DIR ?= $(CURDIR)/.wandb/cache
export WANDB_CONFIG_DIR ?= $(CURDIR)/.wandb/config

.PHONY: demo demo-t2i test test-fast mutants data teacher teacher-t2i clean help

help:
	@echo "make demo   - set up .venv, build the digits shards and distil the shipped teacher (CPU, a few minutes)"
	@echo "make test   - set up .venv and run the test suite"
	@echo "make mutants - break each promise on purpose (tests/mutants.py) and check a test fails every time"
	@echo "make demo-t2i - distil the shipped text-to-image digits teacher (a Stable Diffusion pipeline folder)"
	@echo "make data   - build every shard folder the shipped configs read (digits images, text-to-image prompts)"
	@echo "make teacher - retrain the shipped digits teacher (data/teachers/digits)"
	@echo "make teacher-t2i - retrain the shipped text-to-image digits teacher (data/teachers/t2i-digits)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

data/digits/meta.json: | $(STAMP)
	$(VENV)/bin/distill data digits --out data/digits

data/prompts/t2i-digits/meta.json: data/prompts/t2i-digits.txt | $(STAMP)
	$(VENV)/bin/distill data prompts --src data/prompts/t2i-digits.txt --out data/prompts/t2i-digits

data: data/digits/meta.json data/digits/ref-digits.npz data/prompts/t2i-digits/meta.json

data/digits/ref-digits.npz: data/digits/meta.json
	$(VENV)/bin/distill stats --data data/digits --features digits --out data/digits/ref-digits.npz

# Distil, then evaluate the one-step student and the 50-step teacher on the same FID protocol (digits features,
# 1,000 samples, balanced labels, fixed noise): the last table printed has both.
demo: $(STAMP) data/digits/meta.json data/digits/ref-digits.npz
	$(VENV)/bin/distill fit --config configs/digits.yaml run.dir=runs/demo
	$(VENV)/bin/distill fid runs/demo/checkpoints/last.ckpt --ref data/digits/ref-digits.npz --teacher-steps 50
	$(VENV)/bin/distill fid runs/demo/checkpoints/last.ckpt --ref data/digits/ref-digits.npz

# The text-to-image student against its teacher (25 DDIM steps at the distillation's guidance) on one protocol:
# digits FID of decoded images averaged to 8x8, and prompt accuracy.
demo-t2i: $(STAMP) data
	$(VENV)/bin/distill fit --config configs/t2i-digits.yaml run.dir=runs/demo-t2i
	$(VENV)/bin/distill fid runs/demo-t2i/checkpoints/last.ckpt --ref data/digits/ref-digits.npz --teacher-steps 25
	$(VENV)/bin/distill fid runs/demo-t2i/checkpoints/last.ckpt --ref data/digits/ref-digits.npz

teacher: $(STAMP) data/digits/meta.json
	$(VENV)/bin/distill teacher --config configs/teacher-digits.yaml out=data/teachers/digits --overwrite

teacher-t2i: $(STAMP) data/digits/meta.json
	$(VENV)/bin/distill teacher --config configs/teacher-t2i-digits.yaml out=data/teachers/t2i-digits --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Each curated mutation of the package (tests/mutants.py) must make its tests fail; CI runs this after the suite.
mutants: $(STAMP)
	$(PY) tests/mutants.py

clean:
	rm -rf runs/demo runs/demo-t2i .wandb .pytest_cache
