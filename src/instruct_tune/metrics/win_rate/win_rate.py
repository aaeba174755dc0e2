"""Win rate of system A over system B, one comparison per prompt, ties counted half.

The win rate of InstructGPT's human evaluations and of this project's eval stage: for each prompt, one
response from each system under the same decoding; a judge says which is better. Either give the judge's
scores of both responses (`scores_a`, `scores_b`: the higher wins; within `tie_tolerance` is a tie), or,
with the `outcomes` configuration, the judge's verdicts directly (1 = A wins, 0 = B wins, 0.5 = tie).

    import evaluate
    win_rate = evaluate.load("src/instruct_tune/metrics/win_rate/win_rate.py")
    win_rate.compute(scores_a=[3.0, 1.0, 2.0], scores_b=[1.0, 2.0, 2.0])
    # {'win_rate': 0.5, 'wins': 1, 'ties': 1, 'losses': 1, 'n': 3}
    evaluate.load(".../win_rate.py", "outcomes").compute(outcomes=[1, 0, 0.5], groups=["x", "x", "y"])
    # {'win_rate': 0.5, ..., 'win_rate_by_group': {'x': 0.5, 'y': 0.5}}
"""

from __future__ import annotations

import datasets
import evaluate

_CITATION = """\
@inproceedings{ouyang2022training,
  title={Training language models to follow instructions with human feedback},
  author={Ouyang, Long and Wu, Jeff and Jiang, Xu and others},
  booktitle={Advances in Neural Information Processing Systems},
  year={2022}
}
"""

_DESCRIPTION = """\
Share of prompts on which system A's response beats system B's, ties counted half: (wins + ties / 2) / n.
0.5 means the systems are judged equal; 1.0 that A always wins.
"""

_KWARGS_DESCRIPTION = """
Args:
    scores_a (`list[float]`): the judge's score of system A's response to each prompt (default configuration).
    scores_b (`list[float]`): the judge's score of system B's response to the same prompts.
    outcomes (`list[float]`): with the `outcomes` configuration instead, the verdict per prompt:
        1 (A wins), 0 (B wins) or 0.5 (tie).
    tie_tolerance (`float`, default 0.0): |score_a - score_b| <= this is a tie.
    groups (`list[str]`, optional): a group per prompt (e.g. the task family): adds `win_rate_by_group`.
Returns:
    win_rate (`float`): (wins + ties / 2) / n.
    wins, ties, losses, n (`int`): counts.
    win_rate_by_group (`dict[str, float]`): the win rate within each group, when `groups` is given.
Examples:
    >>> win_rate = evaluate.load("win_rate.py")
    >>> win_rate.compute(scores_a=[3.0, 1.0, 2.0], scores_b=[1.0, 2.0, 2.0])["win_rate"]
    0.5
"""

_OUTCOMES = (0.0, 0.5, 1.0)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class WinRate(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        if self.config_name == "outcomes":
            features = datasets.Features({"outcomes": datasets.Value("float64")})
        else:
            features = datasets.Features(
                {"scores_a": datasets.Value("float64"), "scores_b": datasets.Value("float64")}
            )
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=features,
        )

    def _compute(
        self,
        scores_a: list[float] | None = None,
        scores_b: list[float] | None = None,
        outcomes: list[float] | None = None,
        tie_tolerance: float = 0.0,
        groups: list[str] | None = None,
    ) -> dict:
        if outcomes is None:
            outcomes = [
                0.5 if abs(a - b) <= tie_tolerance else float(a > b)
                for a, b in zip(scores_a, scores_b, strict=True)
            ]
        bad = [o for o in outcomes if o not in _OUTCOMES]
        if bad:
            raise ValueError(f"outcomes must be 1 (A wins), 0 (B wins) or 0.5 (tie); got {bad[:5]}")
        if not outcomes:
            raise ValueError("no comparisons to compute a win rate from")
        result = {
            "win_rate": sum(outcomes) / len(outcomes),
            "wins": sum(o == 1.0 for o in outcomes),
            "ties": sum(o == 0.5 for o in outcomes),
            "losses": sum(o == 0.0 for o in outcomes),
            "n": len(outcomes),
        }
        if groups is not None:
            if len(groups) != len(outcomes):
                raise ValueError(f"{len(groups)} groups for {len(outcomes)} comparisons")
            by_group: dict[str, list[float]] = {}
            for group, outcome in zip(groups, outcomes, strict=True):
                by_group.setdefault(str(group), []).append(outcome)
            result["win_rate_by_group"] = {g: sum(v) / len(v) for g, v in sorted(by_group.items())}
        return result
