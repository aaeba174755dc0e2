"""Exact match and ROUGE-L F1 of responses against reference answers (tasks that have references).

Both compare whitespace-normalised text; ROUGE-L is the F1 of the longest common subsequence of tokens
(words, numbers and single punctuation marks), as in Lin (2004), with no stemming.

    import evaluate
    match = evaluate.load("src/instruct_tune/metrics/reference_match/reference_match.py")
    match.compute(predictions=["1, 2, 3", "1, 3"], references=["1, 2, 3", "1, 2, 3"])
    # {'exact_match': 0.5, 'rouge_l': 0.875}
"""

from __future__ import annotations

import re

import datasets
import evaluate

_CITATION = """\
@inproceedings{lin2004rouge,
  title={ROUGE: A Package for Automatic Evaluation of Summaries},
  author={Lin, Chin-Yew},
  booktitle={Text Summarization Branches Out},
  year={2004}
}
"""

_DESCRIPTION = """\
Share of responses equal to their reference (whitespace-normalised), and mean ROUGE-L F1 over responses.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): responses.
    references (`list[str]`): the reference answer of each response.
Returns:
    exact_match (`float`): share of responses equal to their reference after collapsing whitespace.
    rouge_l (`float`): mean ROUGE-L F1 (longest common token subsequence), in [0, 1].
Examples:
    >>> match = evaluate.load("reference_match.py")
    >>> match.compute(predictions=["a b c"], references=["a c"])["rouge_l"]
    0.8
"""

_TOKEN = re.compile(r"\w+|[^\w\s]")


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        previous = 0
        for j, y in enumerate(b, start=1):
            previous, row[j] = row[j], previous + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l_f1(prediction: str, reference: str) -> float:
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = _lcs(pred, ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ReferenceMatch(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict:
        if not predictions:
            raise ValueError("no responses to compare")
        exact = [
            " ".join(p.split()) == " ".join(r.split()) for p, r in zip(predictions, references, strict=True)
        ]
        rouge = [rouge_l_f1(p, r) for p, r in zip(predictions, references, strict=True)]
        return {"exact_match": sum(exact) / len(exact), "rouge_l": sum(rouge) / len(rouge)}
