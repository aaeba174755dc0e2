"""Agreement between labellers who ranked the same prompt: pairwise agreement and Krippendorff's alpha.

A ranking is a list of tiers (response indices, best first; one tier of several is a tie). Both measures read
it as **fractional ranks**: a tier covering positions p+1..p+s gives each of its responses rank p + (s+1)/2
(tiers [[2], [0, 3], [1]] give ranks 2.5, 4, 1, 2.5 to responses 0..3).

**Pairwise agreement** (InstructGPT reports 72.6% between its labellers): every pair of labellers of one
prompt and every pair of its responses count one comparison; they agree when both put the same one first, or
both tie them. The share of agreeing comparisons, over all prompts (a micro-average).

**Krippendorff's alpha, ordinal** (Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability", Annenberg
School for Communication, sections C and E). Units are (prompt, response) pairs, values their ranks, coders
the labellers; only units with two or more values count. With m_u the number of values in unit u:

    o_ck    = sum_u (number of ordered pairs of values (c, k) from different coders in u) / (m_u - 1)
    n_c     = sum_k o_ck,  n = sum_c n_c
    delta2  = (sum_{g=c..k} n_g - (n_c + n_k) / 2)^2           (ordinal metric; g over the sorted values)
    alpha   = 1 - (n - 1) * sum_{c,k} o_ck delta2_ck / sum_{c,k} n_c n_k delta2_ck

1 is perfect agreement, 0 agreement as by chance; None when there is nothing to compare or no variation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import combinations


def fractional_ranks(tiers: Sequence[Sequence[int]], k: int) -> list[float]:
    """Rank of each of ``k`` responses (1 = best) from tiers, tied responses sharing their mean position."""
    ranks = [0.0] * k
    position = 0
    for tier in tiers:
        for i in tier:
            ranks[i] = position + (len(tier) + 1) / 2
        position += len(tier)
    return ranks


def _relation(ranks: Sequence[float], i: int, j: int) -> int:
    return (ranks[i] < ranks[j]) - (ranks[i] > ranks[j])  # 1: i first, -1: j first, 0: tied


def pair_agreement(a: Sequence[float], b: Sequence[float]) -> tuple[int, int]:
    """``(agreeing, compared)`` response pairs of two labellers' ranks of the same responses."""
    pairs = list(combinations(range(len(a)), 2))
    return sum(_relation(a, i, j) == _relation(b, i, j) for i, j in pairs), len(pairs)


def pairwise_agreement(
    items: Iterable[Mapping[str, Sequence[float]]],
) -> tuple[float | None, dict[str, tuple[int, int]]]:
    """Agreement share over items given as ``{labeller: ranks}``, and ``(agreeing, compared)`` per labeller
    (their comparisons with every other labeller of the same items). None when no item has two labellers."""
    agree = total = 0
    per: dict[str, tuple[int, int]] = {}
    for ranks_by in items:
        for (name_a, a), (name_b, b) in combinations(sorted(ranks_by.items()), 2):
            ok, n = pair_agreement(a, b)
            agree, total = agree + ok, total + n
            for name in (name_a, name_b):
                got = per.get(name, (0, 0))
                per[name] = (got[0] + ok, got[1] + n)
    return (agree / total if total else None), per


def ordinal_alpha(units: Iterable[Sequence[float]]) -> float | None:
    """Krippendorff's alpha with the ordinal metric; each unit lists the values its coders gave it (missing
    values left out). Units with fewer than two values are not pairable and are skipped."""
    pairable = [list(u) for u in units if len(u) >= 2]
    values = sorted({v for u in pairable for v in u})
    if len(values) < 2:
        return None
    at = {v: i for i, v in enumerate(values)}
    size = len(values)
    o = [[0.0] * size for _ in range(size)]
    for unit in pairable:
        m = len(unit)
        for a in range(m):
            for b in range(m):
                if a != b:
                    o[at[unit[a]]][at[unit[b]]] += 1.0 / (m - 1)
    n_c = [sum(row) for row in o]
    n = sum(n_c)
    cumulative = [0.0]
    for count in n_c:
        cumulative.append(cumulative[-1] + count)

    def delta2(c: int, k: int) -> float:
        lo, hi = min(c, k), max(c, k)
        return (cumulative[hi + 1] - cumulative[lo] - (n_c[c] + n_c[k]) / 2) ** 2

    observed = sum(o[c][k] * delta2(c, k) for c in range(size) for k in range(size))
    expected = sum(n_c[c] * n_c[k] * delta2(c, k) for c in range(size) for k in range(size))
    if expected == 0:
        return None
    return 1.0 - (n - 1) * observed / expected
