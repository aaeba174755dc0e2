"""Where a recipe's time goes: run it under the torch profiler and write the op table (self CPU time first).

    python bench/torch_profile.py bench/results/profile_ppo.txt recipes/ppo.py --model_name_or_path ... (recipe args)

The profiles quoted in the README and in the benchmark results were taken this way (commands in each file's header).
"""

from __future__ import annotations

import runpy
import shlex
import sys
from pathlib import Path

import torch


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    out, recipe = Path(sys.argv[1]), sys.argv[2]
    command = " ".join(shlex.quote(a) for a in sys.argv[2:])
    sys.argv = sys.argv[2:]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        try:
            runpy.run_path(recipe, run_name="__main__")
        except SystemExit as stop:
            if stop.code not in (None, 0):
                raise
    table = profile.key_averages()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        f"# python bench/torch_profile.py {out} {command}\n"
        + table.table(sort_by="self_cpu_time_total", row_limit=40)
        + "\n"
    )


if __name__ == "__main__":
    main()
