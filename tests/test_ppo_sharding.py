"""`instruct_tune.ppo.sharding` on a real FSDP2 model over 2 gloo processes sampling different lengths: inside
`gathered_weights` each FSDP unit all-gathers once per rollout, whatever the length (outside it each forward
gathers every block again: one all-gather per block per token of the longest sample), the samples are the
unsharded model's, and the model is sharded and trainable after."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

TIMEOUT = 120  # seconds; the two processes take ~10 s


def _worker(rank: int, folder: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group
    from torch.distributed.tensor import DTensor
    from transformers import GPT2Config, GPT2LMHeadModel

    from instruct_tune.ppo.sharding import gathered_weights, is_sharded

    gathers = []
    all_gather = _fsdp_param_group.foreach_all_gather  # counted: FSDP2 calls it once per unit's all-gather

    def counted(*args, **kwargs):
        gathers.append(1)
        return all_gather(*args, **kwargs)

    _fsdp_param_group.foreach_all_gather = counted

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0  # no dropout: generate does not set eval
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    prompt = torch.tensor([[1, 2, 3, 4]])
    length = 12 if rank == 0 else 3  # the processes sample different numbers of tokens
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=length, min_new_tokens=length, do_sample=False)
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    sharded = is_sharded(model)
    with torch.no_grad(), gathered_weights(model):  # before any forward: the root is set up here
        whole = not any(isinstance(p, DTensor) for p in model.parameters())
        got = model.generate(prompt, max_new_tokens=length, min_new_tokens=length, do_sample=False)
    gathered_once, gathers[:] = len(gathers), []
    resharded = all(isinstance(p, DTensor) for p in model.parameters())
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=length, min_new_tokens=length, do_sample=False)
    per_forward = len(gathers)
    loss = model(prompt, labels=prompt).loss  # a training forward and backward through the root still run
    loss.backward()
    result = {
        "sharded": sharded,
        "whole_inside": whole,
        "resharded_after": resharded,
        "same_tokens": got.tolist() == expected.tolist(),
        "new_tokens": got.shape[1] - prompt.shape[1],
        "all_gathers": gathered_once,
        "all_gathers_per_forward": per_forward,
        "grads": all(p.grad is not None for p in model.parameters()),
    }
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_sampling_of_different_lengths_under_fsdp2_ends_and_matches_unsharded(tmp_path: Path) -> None:
    context = mp.start_processes(_worker, args=(str(tmp_path),), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"sampling under FSDP2 still running after {TIMEOUT} s: a hung all-gather")
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    print(results)
    assert [r["new_tokens"] for r in results] == [12, 3]
    units = 3  # the 2 blocks and the root
    assert [r["all_gathers"] for r in results] == [units, units]
    # Without: the root once (it keeps its weights after forward), each block once per forward; transformers'
    # `generate` runs as many forwards on every process as the longest sample needs (`synced_gpus`).
    assert [r["all_gathers_per_forward"] for r in results] == [1 + 2 * 12, 1 + 2 * 12]
    for r in results:
        assert r == {**r, "sharded": True, "whole_inside": True, "resharded_after": True, "same_tokens": True}
        assert r["grads"]
