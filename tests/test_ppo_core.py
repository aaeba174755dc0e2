"""PPO arithmetic against values worked out by hand on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from instruct_tune.ppo import core

EOS, PAD = 9, 0


def test_truncate_after_first_eos_pads_the_rest_and_flags_missing_eos():
    responses = torch.tensor([[5, 6, EOS, 7, EOS], [5, 6, 7, 8, 3], [EOS, 4, 4, 4, 4]])
    truncated, mask, has_eos = core.truncate_after_eos(responses, EOS, PAD)
    assert truncated.tolist() == [[5, 6, EOS, PAD, PAD], [5, 6, 7, 8, 3], [EOS, PAD, PAD, PAD, PAD]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True]


def test_several_eos_ids_count_as_eos():
    _, mask, has_eos = core.truncate_after_eos(torch.tensor([[1, 2, 3, 4]]), [3, 7], PAD)
    assert mask.tolist() == [[1, 1, 1, 0]] and has_eos.tolist() == [True]


def test_missing_eos_penalty_subtracts_only_from_responses_without_eos():
    scores = torch.tensor([1.0, 1.0, -0.5])
    has_eos = torch.tensor([True, False, False])
    assert core.penalize_missing_eos(scores, has_eos, 2.0).tolist() == [1.0, -1.0, -2.5]
    assert core.penalize_missing_eos(scores, has_eos, None).tolist() == [1.0, 1.0, -0.5]


def test_kl_penalty_per_token_and_score_at_last_real_token():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    scores = torch.tensor([2.0, 3.0])
    rewards, kl, non_score = core.kl_penalized_rewards(scores, logp, ref, mask, beta=0.1)
    # kl = logp - ref on real tokens: row 0: 0.5, -1.0, 0.0; row 1: 1.0, 0.0, (pad) 0
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert torch.allclose(non_score, torch.tensor([[-0.05, 0.1, 0.0], [-0.1, 0.0, 0.0]]))
    # score 2 lands on the last token of row 0 (index 2), score 3 on index 1 of row 1 (its last real token)
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 2.0], [-0.1, 3.0, 0.0]]))


def test_gae_matches_a_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.2, 7.0]])  # the value on padding must be ignored
    mask = torch.tensor([[1, 1, 1, 0]])
    gamma, lam = 0.9, 0.8
    advantages, returns = core.gae_advantages(rewards, values, mask, gamma, lam)
    d2 = 1.0 + gamma * 0.0 - 0.2  # last real token: next value is 0
    d1 = 0.0 + gamma * 0.2 - 0.4
    d0 = 0.0 + gamma * 0.4 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    assert torch.allclose(advantages, torch.tensor([[a0, a1, a2, 0.0]]))
    assert torch.allclose(returns, torch.tensor([[a0 + 0.5, a1 + 0.4, a2 + 0.2, 0.0]]))


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.1, -0.2, 0.3, 2.0]])
    values = torch.tensor([[1.0, 0.5, -0.5, 0.25]])
    mask = torch.ones(1, 4, dtype=torch.long)
    advantages, returns = core.gae_advantages(rewards, values, mask, 1.0, 1.0)
    to_go = torch.tensor([[2.2, 2.1, 2.3, 2.0]])
    assert torch.allclose(returns, to_go)
    assert torch.allclose(advantages, to_go - values)


def test_masked_whiten_uses_only_real_tokens():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = core.masked_whiten(values, mask)
    real = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = (real - 3.0) / math.sqrt(real.var(unbiased=True).item() + 1e-8)
    assert torch.allclose(out[mask.bool()], expected, atol=1e-6)
    assert out[0, 2] == 0.0
    kept_mean = core.masked_whiten(values, mask, shift_mean=False)
    assert torch.allclose(kept_mean[mask.bool()], expected + 3.0, atol=1e-6)


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    # ratios e^0.5 = 1.65, e^-0.5 = 0.61, e^0.1 = 1.105
    new = torch.tensor([[0.5, -0.5, 0.1]])
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3)
    loss, stats = core.policy_loss(new, old, adv, mask, cliprange=0.2)
    r = torch.exp(new)[0]
    per_token = [
        max(-1.0 * r[0].item(), -1.0 * 1.2),  # positive advantage, ratio above 1.2: clipped term wins
        max(-1.0 * r[1].item(), -1.0 * 0.8),  # positive advantage, ratio below 0.8: unclipped wins
        max(2.0 * r[2].item(), 2.0 * 1.105170918),  # ratio inside the clip range
    ]
    assert loss.item() == pytest.approx(sum(per_token) / 3, rel=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["approxkl"].item() == pytest.approx(0.5 * (0.25 + 0.25 + 0.01) / 3, rel=1e-6)


def test_clipped_value_loss_by_hand():
    old = torch.tensor([[1.0, 1.0]])
    new = torch.tensor([[2.0, 1.1]])
    returns = torch.tensor([[3.0, 0.0]])
    mask = torch.ones(1, 2)
    loss, stats = core.value_loss(new, old, returns, mask, cliprange_value=0.2)
    # token 0: unclipped (2-3)^2 = 1, clipped (1.2-3)^2 = 3.24 -> 3.24; token 1: (1.1)^2 = 1.21 both
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.21) / 2, rel=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_masked_losses_ignore_padding():
    mask = torch.tensor([[1, 0]])
    loss, _ = core.policy_loss(
        torch.tensor([[0.0, 5.0]]), torch.zeros(1, 2), torch.tensor([[1.0, 100.0]]), mask, 0.2
    )
    assert loss.item() == pytest.approx(-1.0)


def test_logprobs_use_the_sampling_temperature():
    logits = torch.tensor([[[2.0, 0.0, -2.0]]])
    tokens = torch.tensor([[0]])
    for t in (1.0, 0.5):
        expected = torch.log_softmax(logits / t, dim=-1)[0, 0, 0]
        assert core.logprobs_from_logits(logits, tokens, t).item() == pytest.approx(expected.item())
    uniform = torch.zeros(1, 1, 4)
    assert core.entropy_from_logits(uniform).item() == pytest.approx(math.log(4))


def test_adaptive_kl_controller_follows_the_lm_human_preferences_rule():
    ctl = core.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(kl=12.0, n_episodes=100)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))
    ctl.update(kl=5.4, n_episodes=500)  # error -0.1
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 0.01) * (1 - 0.1 * 0.05))
    restored = core.AdaptiveKLController(1.0, target=6.0, horizon=10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    fixed = core.FixedKLController(0.05)
    fixed.update(kl=100.0, n_episodes=1000)
    assert fixed.value == 0.05
    with pytest.raises(ValueError, match="target"):
        core.AdaptiveKLController(0.1, target=0.0, horizon=1)
