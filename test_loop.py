"""The specification of this project, as tests. Run: python -m pytest -q test_loop.py

Sections follow the modules: loop.py (the maths), appworld_env.py (the world), model.py and
rollout.py (one model that samples and learns), train.py (the whole loop). Everything runs on a CPU
with no internet: a tiny random model with SmolLM2's tokenizer, and the offline AppWorld mini-world.
"""
import torch

torch.set_num_threads(1)  # with the other core busy, 2 threads slow torch down badly (DESIGN.md 6)


# ====================================================================================== loop.py

import doctest

import pytest

import loop
from loop import (clipped_surrogate, grpo_advantages, importance_weights, keep_mask, leave_one_out,
                  loop_loss)


def test_loop_docstring_examples_hold():
    assert doctest.testmod(loop).failed == 0


def test_leave_one_out_worked_example():
    a = leave_one_out(torch.tensor([[1, 0, .5, 0, 1, .25]]))
    torch.testing.assert_close(a, torch.tensor([[.65, -.55, .05, -.55, .65, -.25]]))


@pytest.mark.parametrize("k", [2, 3, 6, 8])
def test_leave_one_out_is_rescaled_centred_reward(k):
    r = torch.rand(5, k, generator=torch.Generator().manual_seed(k))  # (N, K)
    expected = k / (k - 1) * (r - r.mean(dim=1, keepdim=True))
    torch.testing.assert_close(leave_one_out(r), expected)
    # and literally "R_k minus the mean of the others"
    for i in range(k):
        others = torch.cat([r[:, :i], r[:, i + 1:]], dim=1)
        torch.testing.assert_close(leave_one_out(r)[:, i], r[:, i] - others.mean(dim=1))


def test_constant_group_gets_zero_advantage_and_is_dropped_whole():
    r = torch.tensor([[1.0, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]])
    for adv in (leave_one_out(r), leave_one_out(r, normalize="std"), grpo_advantages(r)):
        assert torch.all(adv[:2] == 0)
        assert keep_mask(adv)[:2].sum() == 0 and keep_mask(adv)[2].all()


def test_group_of_one_rollout_raises():
    with pytest.raises(ValueError, match="at least 2 rollouts"):
        leave_one_out(torch.tensor([[1.0], [0.0]]))
    with pytest.raises(ValueError, match="at least 2 rollouts"):
        leave_one_out([torch.tensor([1.0, 0.0]), torch.tensor([1.0])])


def test_unequal_groups_are_each_their_own_baseline():
    groups = [torch.tensor([1.0, 0, .5]), torch.tensor([0.0, 1, 1, 0, .25])]
    out = leave_one_out(groups)
    for g, a in zip(groups, out):
        torch.testing.assert_close(a, leave_one_out(g[None])[0])
    assert [m.tolist() for m in keep_mask(out)] == [[True, True, False], [True, True, True, True, True]]


def test_reward_normalised_and_grpo_estimators():
    r = torch.tensor([[1.0, 0, .5, 0, 1, .25]])
    std = r.std()
    torch.testing.assert_close(leave_one_out(r, normalize="std"), leave_one_out(r) / std)
    torch.testing.assert_close(grpo_advantages(r), (r - r.mean()) / std)
    with pytest.raises(ValueError, match="normalize"):
        leave_one_out(r, normalize="minmax")


def _policy_batch(seed=0, b=3, t=7, v=5):
    """A tiny differentiable 'policy': free logits per position; returns what loop_loss needs."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, requires_grad=True)  # (B, T, V), the parameters
    tokens = torch.randint(v, (b, t), generator=g)  # (B, T)
    mask = torch.rand(b, t, generator=g) < 0.6  # (B, T)
    mask[:, 0] = True
    adv = torch.randn(b, generator=g)  # (B,)
    turn_ids = torch.where(mask, torch.arange(t).expand(b, t) // 3, -1)  # (B, T): turns of 3 positions

    def logp_fn():
        return logits.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]  # (B, T)
    return logits, logp_fn, mask, adv, turn_ids


@pytest.mark.parametrize("clip", ["paper", "official", "none"])
def test_on_policy_token_loss_gradient_is_reinforce(clip):
    logits, logp_fn, mask, adv, _ = _policy_batch()
    logp = logp_fn()  # (B, T)
    loss, stats = loop_loss(logp, logp.detach(), adv, mask, clip=clip)
    (grad,) = torch.autograd.grad(loss, logits)
    # REINFORCE: -1/B sum_b A_b / |a(x_b)| sum_{t in a(x_b)} grad log p_t
    reinforce = -(adv[:, None] * torch.where(mask, logp_fn(), 0.0)).sum(1) / mask.sum(1)
    (expected,) = torch.autograd.grad(reinforce.mean(), logits)
    torch.testing.assert_close(grad, expected)
    assert stats.clip_frac == 0 and abs(stats.approx_kl) < 1e-7 and stats.ratio_mean == 1


def _grad_at_ratio(w, a, clip, eps=0.1):
    """d loss / d logp of a single agent token whose importance weight is w, advantage a."""
    logp = torch.tensor([[float(torch.log(torch.tensor(w)))]], requires_grad=True)  # (1, 1)
    loss, _ = loop_loss(logp, torch.zeros(1, 1), torch.tensor([a]), torch.ones(1, 1, dtype=torch.bool),
                        eps=eps, clip=clip)
    (g,) = torch.autograd.grad(loss, logp)
    return g.item()


def test_paper_clip_stops_gradient_outside_one_plus_minus_eps():
    assert _grad_at_ratio(1.2, +1.0, "paper") == 0  # A > 0, w > 1 + eps
    assert _grad_at_ratio(0.8, -1.0, "paper") == 0  # A < 0, w < 1 - eps
    assert _grad_at_ratio(1.05, +1.0, "paper") != 0
    assert _grad_at_ratio(0.905, -1.0, "paper") != 0  # inside [1 - eps, ...]
    assert _grad_at_ratio(0.5, +1.0, "paper") != 0  # PPO never clips the side that undoes a step
    assert _grad_at_ratio(1.5, -1.0, "paper") != 0


def test_official_clip_uses_asymmetric_range():
    assert _grad_at_ratio(1.2, +1.0, "official") == 0
    assert _grad_at_ratio(0.905, -1.0, "official") == 0  # below 1/(1+eps) = 0.909
    assert _grad_at_ratio(0.92, -1.0, "official") != 0
    assert _grad_at_ratio(1.2, +1.0, "none") != 0 and _grad_at_ratio(0.5, -1.0, "none") != 0


def test_turn_and_trajectory_weights_are_products_of_token_ratios():
    _, logp_fn, mask, _, turn_ids = _policy_batch(seed=1)
    logp = logp_fn().detach()
    old = logp + 0.1 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(2))
    ratio = torch.where(mask, (logp - old).exp(), 1.0)  # (B, T)
    w_tok = importance_weights(logp, old, mask, "token")
    w_turn = importance_weights(logp, old, mask, "turn", turn_ids)
    w_traj = importance_weights(logp, old, mask, "trajectory")
    torch.testing.assert_close(w_tok, ratio)
    for b in range(mask.shape[0]):
        torch.testing.assert_close(w_traj[b][mask[b]], ratio[b].prod().expand(int(mask[b].sum())))
        for turn in turn_ids[b][mask[b]].unique():
            in_turn = mask[b] & (turn_ids[b] == turn)
            torch.testing.assert_close(w_turn[b][in_turn], ratio[b][in_turn].prod().expand(int(in_turn.sum())))
    assert torch.all(w_turn[~mask] == 1) and torch.all(w_traj[~mask] == 1)


def test_all_levels_coincide_when_every_ratio_is_one():
    _, logp_fn, mask, adv, turn_ids = _policy_batch(seed=3)
    logp = logp_fn().detach()
    losses = []
    for level in ("token", "turn", "trajectory"):
        assert torch.all(importance_weights(logp, logp, mask, level, turn_ids) == 1)
        losses.append(loop_loss(logp, logp, adv, mask, level=level, turn_ids=turn_ids)[0])
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(losses[0], losses[2])


@pytest.mark.parametrize("level", ["token", "turn", "trajectory"])
def test_nan_and_inf_at_masked_positions_give_finite_loss_and_zero_gradient(level):
    _, logp_fn, mask, adv, turn_ids = _policy_batch(seed=4)
    clean = logp_fn().detach()
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf")]).repeat(clean.numel())[:clean.numel()]
    logp = torch.where(mask, clean, garbage.view_as(clean)).requires_grad_(True)  # (B, T)
    old = torch.where(mask, clean - 0.05, garbage.flip(0).view_as(clean))  # (B, T)
    loss, stats = loop_loss(logp, old, adv, mask, level=level, turn_ids=turn_ids)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(getattr(stats, f)) for f in ("approx_kl", "clip_frac", "ratio_mean", "ratio_max"))
    assert torch.all(logp.grad[~mask] == 0) and torch.isfinite(logp.grad).all()
    assert logp.grad[mask].abs().sum() > 0


def test_appending_padding_does_not_change_loss_or_gradient():
    _, logp_fn, mask, adv, turn_ids = _policy_batch(seed=5)
    logp = logp_fn().detach().requires_grad_(True)
    old = logp.detach() - 0.03
    loss, _ = loop_loss(logp, old, adv, mask, level="turn", turn_ids=turn_ids)
    (g,) = torch.autograd.grad(loss, logp)
    pad = 4
    logp_p = torch.cat([logp.detach(), torch.full((logp.shape[0], pad), float("nan"))], 1).requires_grad_(True)
    old_p = torch.cat([old, torch.zeros(old.shape[0], pad)], 1)
    mask_p = torch.cat([mask, torch.zeros(mask.shape[0], pad, dtype=torch.bool)], 1)
    turn_p = torch.cat([turn_ids, torch.full((mask.shape[0], pad), -1)], 1)
    loss_p, _ = loop_loss(logp_p, old_p, adv, mask_p, level="turn", turn_ids=turn_p)
    (g_p,) = torch.autograd.grad(loss_p, logp_p)
    torch.testing.assert_close(loss_p, loss)
    torch.testing.assert_close(g_p[:, :-pad], g)


def test_trajectory_without_agent_tokens_counts_as_zero():
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    loss, stats = loop_loss(logp, torch.zeros(2, 3), torch.tensor([1.0, 5.0]), mask)
    torch.testing.assert_close(loss, torch.tensor(-0.5))  # (-1 + 0) / 2
    assert stats.agent_tokens == 2


def test_minibatch_loss_is_mean_of_trajectory_losses_and_split_invariant():
    logits, logp_fn, mask, adv, turn_ids = _policy_batch(seed=6, b=6)
    old = logp_fn().detach() + 0.05 * torch.randn(6, 7, generator=torch.Generator().manual_seed(7))
    loss, _ = loop_loss(logp_fn(), old, adv, mask)
    alone = [loop_loss(logp_fn()[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1])[0] for i in range(6)]
    torch.testing.assert_close(loss, torch.stack(alone).mean())
    (full,) = torch.autograd.grad(loss, logits)
    for split in ([2, 4], [1, 2, 3], [6]):
        total, start = torch.zeros_like(logits), 0
        for n in split:
            sl = slice(start, start + n)
            part, _ = loop_loss(logp_fn()[sl], old[sl], adv[sl], mask[sl], num_trajectories=6)
            total += torch.autograd.grad(part, logits)[0]
            start += n
        torch.testing.assert_close(total, full)


def test_bad_options_are_rejected_by_name():
    lp, m = torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="level"):
        importance_weights(lp, lp, m, "episode")
    with pytest.raises(ValueError, match="turn_ids"):
        importance_weights(lp, lp, m, "turn")
    with pytest.raises(ValueError, match="clip"):
        clipped_surrogate(lp, torch.ones(1), clip="huber")


# ============================================================================= appworld_env.py


# ===================================================================== model.py and rollout.py


# ===================================================================================== train.py
