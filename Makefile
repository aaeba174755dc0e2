# instruct-tune: `make rlhf`-style entry points. Every target installs what is missing into .venv first.
#   make rlhf                 sft -> reward -> ppo -> eval on the tiny default (finished stages are kept)
#   make test                 run the test suite (what CI runs)
#   make sft                  SFT of the built-in tiny default -> outputs/$(RUN)/sft
#   make sft CONFIG=recipes/configs/gpt2-alpaca MODEL=openai-community/gpt2
#   make reward               reward model from outputs/$(RUN)/sft -> outputs/$(RUN)/reward
#   make ppo                  PPO from outputs/$(RUN)/sft against outputs/$(RUN)/reward -> outputs/$(RUN)/ppo
#   make eval                 outputs/$(RUN)/ppo vs outputs/$(RUN)/sft on held-out prompts -> outputs/$(RUN)/eval
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= tiny
CONFIG ?= recipes/configs/tiny
MODEL ?=
OUT := outputs/$(RUN)
MODEL_FLAG := $(if $(MODEL),--model_name_or_path $(MODEL),)
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

# A CPU-only machine gets the CPU build of torch (no CUDA wheels); a machine with an NVIDIA driver gets the
# default CUDA build. Override with TORCH_SPEC=... (and TORCH_INDEX=<url> for another wheel index).
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch>=2.6,torch==2.13.0)
TORCH_INDEX ?=

# accelerate launch gives a CPU process one thread unless told otherwise; on a CPU-only machine every core
# goes to the one training process (measured: PPO on the tiny default 503 s with 1 thread, 278 s with 2).
CPU_THREADS := $(if $(HAS_GPU),,$(shell nproc 2>/dev/null || echo 1))
LAUNCH = $(BIN)/accelerate launch --config_file recipes/accelerate/single_device.yaml \
	$(if $(CPU_THREADS),--num_cpu_threads_per_process $(CPU_THREADS),)

.PHONY: rlhf install test lint sft reward ppo eval tiny clean-outputs help
help:
	@sed -n '1,9p' Makefile

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff check src recipes tests bench

test: install
	$(BIN)/python -m pytest -q

tiny: install
	$(BIN)/instruct-tune build-tiny --data data/tiny --out models/tiny-gpt2

sft: install $(if $(filter recipes/configs/tiny,$(CONFIG)),tiny,)
	$(LAUNCH) recipes/sft.py --config $(CONFIG)/sft.yaml --output_dir $(OUT)/sft $(MODEL_FLAG)

# The reward model starts from the SFT run folder (and checks its chat template against it).
reward: install $(if $(wildcard $(OUT)/sft/adapter_config.json $(OUT)/sft/config.json),,sft)
	$(LAUNCH) recipes/reward.py --config $(CONFIG)/reward.yaml --output_dir $(OUT)/reward \
		--model_name_or_path $(OUT)/sft --policy_path $(OUT)/sft

# PPO starts from the SFT run folder and optimises the reward model of the reward run folder.
ppo: install $(if $(wildcard $(OUT)/reward/reward_normalization.json),,reward)
	$(LAUNCH) recipes/ppo.py --config $(CONFIG)/ppo.yaml --output_dir $(OUT)/ppo \
		--model_name_or_path $(OUT)/sft --reward_model_path $(OUT)/reward

# Evaluation: the PPO policy against its SFT start, judged by the reward model and (tiny task) the gold judge.
eval: install $(if $(wildcard $(OUT)/ppo/trainer_state.json),,ppo)
	$(LAUNCH) recipes/eval.py --config $(CONFIG)/eval.yaml --output_dir $(OUT)/eval \
		--sft_path $(OUT)/sft --policy_paths $(OUT)/ppo --reward_model_path $(OUT)/reward

# The whole pipeline: each stage runs only when its run folder is missing (delete a folder to redo it).
rlhf: eval
	@cat $(OUT)/eval/results.md
