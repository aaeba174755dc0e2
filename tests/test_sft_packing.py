"""SFT's batch layouts and LM head on the tiny model: chats packed in separate rows (bfd rows, batches repacked
side by side), and the plain LM head that replaces TRL's fused one off CUDA.

The SFT stage end to end (run folder, labels, full/QLoRA, resume, DDP): `test_sft.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from stage_runs import lora_args
from test_sft import TASKS, assert_finite_number, losses, read_json, sft_args
from transformers import AutoModelForCausalLM

from instruct_tune.config import ConfigError, DataArguments, ModelArguments
from instruct_tune.data.row_packing import REAL_TOKENS, RowPackedCollator, repack_batch, row_position_ids
from instruct_tune.stages.sft import run_sft

# --- packing in separate rows --------------------------------------------------------------------------


def test_row_packed_collator_positions_labels_and_count() -> None:
    batch = RowPackedCollator(pad_token_id=0)(
        [
            {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "seq_lengths": [3, 2]},
            {"input_ids": [3, 4], "labels": [3, 4], "seq_lengths": [2]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [3, 4, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    # first token of each chat and all padding never count as targets
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 4, -100, -100, -100]]
    assert batch[REAL_TOKENS].item() == 7 and "attention_mask" not in batch
    with pytest.raises(ValueError, match="does not fit"):
        row_position_ids([3, 4], 6)


def test_rows_keep_chats_apart(tiny_model_dir: Path) -> None:
    """A chat packed behind another gets exactly the logits it gets alone: no attention across chats."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    first, second = torch.arange(3, 12), torch.arange(20, 27)
    batch = RowPackedCollator(pad_token_id=0)(
        [{"input_ids": torch.cat([first, second]).tolist(), "seq_lengths": [9, 7]}, {"input_ids": [1, 2, 3]}]
    )
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        alone = model(input_ids=second[None]).logits
        # the same row with one 2D mask (what wrapped packing does) lets the second chat see the first
        mixed = model(input_ids=batch["input_ids"][:1], attention_mask=torch.ones(1, 16, dtype=torch.long)).logits
    torch.testing.assert_close(packed[0, 9:16], alone[0], atol=1e-5, rtol=1e-5)
    assert (mixed[0, 9:16] - alone[0]).abs().max() > 1e-2


def test_sft_packing_per_row(tiny_model_dir: Path, tiny_sft_file: Path, tmp_path: Path) -> None:
    """bfd rows train and evaluate; num_tokens counts every real token of the packed rows."""
    training = sft_args(
        tmp_path / "rows", max_steps=6, packing=True, packing_strategy="bfd", packing_per_row=True
    )
    data = DataArguments(dataset_name=str(tiny_sft_file), eval_fraction=0.1, per_task_metrics=True)
    run_dir = run_sft(training, data, ModelArguments(model_name_or_path=str(tiny_model_dir)))
    metrics, state = read_json(run_dir / "metrics.json"), read_json(run_dir / "trainer_state.json")
    assert_finite_number(metrics["eval_loss"], "eval_loss")
    assert all(f"eval_{t}_loss" in metrics for t in TASKS)
    # 6 steps x 8 rows of up to 128 tokens: far more than 6 x 128 (what TRL's flat-row count would give)
    tokens = max(entry.get("num_tokens", 0) for entry in state["log_history"])
    assert 6 * 8 * 60 < tokens <= 6 * 8 * 128
    with pytest.raises(ConfigError, match="packing_per_row"):
        sft_args(tmp_path / "bad", packing=False, packing_per_row=True)


def test_repack_batch_lays_chats_side_by_side() -> None:
    rows = repack_batch(
        [
            {"input_ids": [1, 2, 3, 4, 5, 6], "labels": [-100, -100, 3, 4, 5, 6]},
            {"input_ids": [7, 8], "labels": [-100, 8]},
            {"input_ids": [9, 10, 11, 12], "labels": [-100, 10, 11, 12]},
            {"input_ids": [13, 14], "labels": [13, 14]},
        ]
    )
    # Rows as wide as the longest chat (6), longest first, each chat into the first row with room.
    assert [r["seq_lengths"] for r in rows] == [[6], [4, 2], [2]]
    assert rows[1]["input_ids"] == [9, 10, 11, 12, 7, 8] and rows[1]["labels"] == [-100, 10, 11, 12, -100, 8]
    batch = RowPackedCollator(pad_token_id=0, repack=True)(
        [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}, {"input_ids": [6]}]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, 5, -100]] and batch[REAL_TOKENS].item() == 6


def test_repack_batches_trains_as_padding_does(tiny_model_dir: Path, tiny_sft_file: Path, tmp_path: Path) -> None:
    """The same chats and loss each step on fewer positions: the losses of a padded run, and its token count."""
    data = DataArguments(dataset_name=str(tiny_sft_file), eval_fraction=0.1)
    model = ModelArguments(model_name_or_path=str(tiny_model_dir))
    runs = {}
    for repack in (False, True):
        training = sft_args(tmp_path / f"repack-{repack}", max_steps=6, logging_steps=1, repack_batches=repack)
        run_dir = run_sft(training, data, model)
        runs[repack] = (read_json(run_dir / "trainer_state.json"), read_json(run_dir / "metrics.json"))
    (padded, padded_metrics), (repacked, repacked_metrics) = runs[False], runs[True]
    assert losses(repacked) == pytest.approx(losses(padded), rel=1e-4)
    assert repacked_metrics["eval_loss"] == pytest.approx(padded_metrics["eval_loss"], rel=1e-4)
    count = [max(e.get("num_tokens", 0) for e in state["log_history"]) for state in (padded, repacked)]
    assert count[0] == count[1] and count[0] > 6 * 8 * 10
    with pytest.raises(ConfigError, match="repack_batches"):
        sft_args(tmp_path / "bad", packing=True, repack_batches=True)


# --- the plain LM head ---------------------------------------------------------------------------------


@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "lora"])
def test_plain_lm_head_trains_as_trls_fused_head(
    use_peft: bool, tiny_model_dir: Path, tiny_sft_file: Path, tmp_path: Path
) -> None:
    """On CPU the model's own head replaces TRL's fused-head fallback: same losses, entropy and token accuracy
    every step, same eval loss; only the arithmetic's order differs."""
    data = DataArguments(dataset_name=str(tiny_sft_file), eval_fraction=0.1)
    model = lora_args(tiny_model_dir, use_peft=use_peft)
    logs, evals = {}, {}
    for fused in (True, False):
        training = sft_args(tmp_path / f"fused-{fused}", max_steps=6, logging_steps=1, fused_lm_head=fused)
        run_dir = run_sft(training, data, model)
        logs[fused] = [e for e in read_json(run_dir / "trainer_state.json")["log_history"] if "loss" in e]
        evals[fused] = read_json(run_dir / "metrics.json")["eval_loss"]
    assert len(logs[False]) == len(logs[True]) == 6
    for key in ("loss", "entropy", "mean_token_accuracy", "num_tokens"):
        assert [e[key] for e in logs[False]] == pytest.approx([e[key] for e in logs[True]], rel=1e-4), key
    assert evals[False] == pytest.approx(evals[True], rel=1e-5)


@pytest.mark.parametrize("chunk_rows", [None, 5], ids=["whole", "chunked"])
def test_plain_lm_head_is_chosen_off_cuda(
    chunk_rows: int | None, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unset, the plain head replaces TRL's on CPU and not on CUDA; an explicit choice wins; its fields and
    gradients match TRL's, also when the logits are taken in checkpointed chunks of 5 positions."""
    from trl.trainer.utils import add_fused_lm_head

    from instruct_tune.models import lm_head
    from instruct_tune.models.lm_head import select_lm_head

    if chunk_rows:
        vocab = AutoModelForCausalLM.from_pretrained(tiny_model_dir).config.vocab_size
        monkeypatch.setattr(lm_head, "CHUNK_ELEMENTS", chunk_rows * vocab)

    def patched():
        net = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        add_fused_lm_head(net, outputs=("log_probs", "entropy", "is_top1"))
        return net

    assert not select_lm_head(patched(), torch.device("cuda"))
    assert not select_lm_head(patched(), torch.device("cpu"), fused=True)
    fused, plain = patched(), patched()
    assert select_lm_head(plain, torch.device("cpu"))
    ids = torch.randint(0, fused.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :5] = -100
    labels[2] = -100  # a row without labels
    out = {name: net(input_ids=ids, labels=labels, fused_lm_head=True) for name, net in (("f", fused), ("p", plain))}
    for key in ("log_probs", "entropy"):
        torch.testing.assert_close(out["p"][key], out["f"][key], rtol=1e-5, atol=1e-5)
    assert torch.equal(out["p"].is_top1, out["f"].is_top1) and torch.equal(out["p"].label_mask, out["f"].label_mask)
    out["p"].loss.backward()
    out["f"].loss.backward()
    for (name, a), b in zip(plain.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
