"""One round of InstructGPT's human-feedback loop on a finished chain: sample the policy into a labelling
project, label (the scripted gold labeller over the app's HTTP API, or people), export, retrain the reward
model on old + new comparisons, PPO from SFT, one eval of both rounds (ROUND/round.md).

python recipes/round.py --config recipes/configs/tiny/round.yaml --run_dir outputs/tiny
python recipes/round.py --config recipes/configs/tiny/round.yaml --run_dir outputs/tiny --labeller human
"""

from instruct_tune.label.round import main

if __name__ == "__main__":
    raise SystemExit(main())
