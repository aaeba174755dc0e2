"""The machine's measured matmul peak (fp32, bf16) and our SFT's achieved share of the fp32 peak.

    python bench/machine.py        (after bench/sft.py; `make bench` runs both)

Peak: the best GFLOP/s of square torch.matmul over sizes 256-4096 on all cores (sizes whose single product
takes over a second are skipped). Achieved: 6 x parameters x
tokens/s of our SFT stage (bench/results/sft.json), the usual training-FLOPs estimate (forward + backward).
Writes bench/results/machine.json.
"""

from __future__ import annotations

import json
import time

import torch
from common import RESULTS, machine, write_result


def matmul_gflops(dtype: torch.dtype, sizes: tuple[int, ...] = (256, 512, 1024, 2048, 4096), seconds: float = 1.0) -> float:
    """Best GFLOP/s of square matmuls; stops growing the size once one product takes longer than `seconds`
    (a dtype without a fast kernel on this CPU would otherwise take minutes per product)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        calls, start = 0, time.perf_counter()
        a @ b  # warm up, timed: the size limit
        if time.perf_counter() - start > seconds:
            break
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            calls += 1
        best = max(best, 2 * n**3 * calls / (time.perf_counter() - start) / 1e9)
    return best


def main() -> None:
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    result: dict = {"matmul_gflops_fp32": fp32, "matmul_gflops_bf16": bf16, "threads": torch.get_num_threads()}
    sft_file = RESULTS / "sft.json"
    if sft_file.is_file():
        sft = json.loads(sft_file.read_text())
        n_params = sft["settings"]["model_parameters"]
        achieved = 6 * n_params * sft["tokens_per_s_ours"] / 1e9
        result.update(
            sft_achieved_gflops=achieved,
            sft_share_of_fp32_peak=achieved / fp32,
            trl_fastest_share_of_fp32_peak=6 * n_params * sft["tokens_per_s_trl_fastest"] / 1e9 / fp32,
        )
    result["machine"] = machine()
    print(f"matmul peak fp32 {fp32:.1f} GFLOP/s, bf16 {bf16:.1f} GFLOP/s")
    if "sft_share_of_fp32_peak" in result:
        print(f"our SFT: {result['sft_achieved_gflops']:.1f} GFLOP/s = {result['sft_share_of_fp32_peak']:.0%} of the "
              f"fp32 peak (TRL's fastest setting {result['trl_fastest_share_of_fp32_peak']:.0%})")
    write_result("machine", result)


if __name__ == "__main__":
    main()
