"""Perplexity of a language model on held-out text, from per-text negative log-likelihoods.

The model is run by the caller (any model, any batching); this module does the aggregation:
perplexity = exp(sum of token NLLs / number of predicted tokens), i.e. tokens are weighted equally, not texts.
Unlike the Hub's `perplexity` metric it loads no model, so it works offline and on adapters.

    import evaluate
    ppl = evaluate.load("src/instruct_tune/metrics/perplexity/perplexity.py")
    ppl.compute(nll=[4.2, 3.1], tokens=[3, 2])   # {'perplexity': exp(7.3 / 5), 'mean_nll': 1.46, 'tokens': 5}
"""

from __future__ import annotations

import math

import datasets
import evaluate

_DESCRIPTION = """\
Token-level perplexity exp(sum NLL / sum tokens) from the summed negative log-likelihood (natural log) of each
text and its number of predicted tokens. InstructGPT's "alignment tax" shows as a higher perplexity of the
RL policy than of its SFT start on pretraining-like text.
"""

_KWARGS_DESCRIPTION = """
Args:
    nll (`list[float]`): summed negative log-likelihood (nats) of the predicted tokens of each text.
    tokens (`list[int]`): number of predicted tokens of each text.
Returns:
    perplexity (`float`): exp(sum(nll) / sum(tokens)).
    mean_nll (`float`): sum(nll) / sum(tokens), nats per token.
    tokens (`int`): sum(tokens).
Examples:
    >>> ppl = evaluate.load("perplexity.py")
    >>> round(ppl.compute(nll=[2.0, 0.0], tokens=[1, 1])["perplexity"], 4)
    2.7183
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"nll": datasets.Value("float64"), "tokens": datasets.Value("int64")}),
        )

    def _compute(self, nll: list[float], tokens: list[int]) -> dict:
        total = sum(tokens)
        if total <= 0:
            raise ValueError("no predicted tokens: every text is shorter than two tokens")
        if any(t < 0 for t in tokens) or any(not math.isfinite(x) or x < 0 for x in nll):
            raise ValueError("nll must be finite and >= 0, tokens >= 0")
        mean_nll = sum(nll) / total
        return {"perplexity": math.exp(mean_nll), "mean_nll": mean_nll, "tokens": total}
