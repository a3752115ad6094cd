"""LOOP's objective as pure tensor functions: leave-one-out advantages, importance weights, clipping.

Chen et al., "Reinforcement Learning for Long-Horizon Interactive LLM Agents", 2025,
https://arxiv.org/abs/2502.01600. Equation numbers below are the paper's.

LOOP samples K rollouts x_1..x_K of one task, scores each with the task's unit tests (R_k), and
gives each rollout the leave-one-out advantage (Eq. 3)

    A_k = R_k - 1/(K-1) * sum_{i != k} R_i .

It then takes PPO steps on the agent's own tokens only (Eq. 10, per-token importance weights):

    L(theta) = 1/K sum_k 1/|a(x_k)| sum_{t in a(x_k)} min( w_t * A_k , g_eps(A_k) ),
    w_t = pi_theta(x_t | x_<t) / pi_old(x_t | x_<t),        g_eps(A) = A + eps * |A| .

No value network, no reference model, no KL penalty. Everything here takes padded batches of B trajectories
of T positions, with a boolean `mask` that is True exactly on the tokens the agent generated. Masked-out
positions contribute exactly zero loss and zero gradient even when they hold NaN or inf, because every
reduction goes through `torch.where` (NaN * 0 is NaN). This file imports only torch: copy it anywhere.
"""
from dataclasses import dataclass

import torch
from torch import Tensor

Rewards = Tensor | list[Tensor]  # (N, K) for N tasks with K rollouts each, or N groups of unequal size


def _per_group(fn, rewards: Rewards) -> Rewards:
    """Apply `fn` to each group of rollouts of one task: all rows of an (N, K) tensor at once, or each
    item of a list as a row of its own. The leave-one-out baseline needs 2 or more rollouts per group."""
    if isinstance(rewards, Tensor) and rewards.dim() != 2:
        raise ValueError(f"rewards must be (N tasks, K rollouts), got shape {tuple(rewards.shape)}")
    groups = [rewards] if isinstance(rewards, Tensor) else [r.reshape(1, -1) for r in rewards]
    k = min((g.shape[-1] for g in groups), default=2)
    if k < 2:
        raise ValueError(f"a group has {k} rollout(s): the leave-one-out baseline needs at least 2 rollouts of a task "
                         "(sample K >= 2, and drop tasks whose other rollouts were lost)")
    if isinstance(rewards, Tensor):
        return fn(rewards.float())
    return [fn(g.float()).reshape(-1) for g in groups]  # N x (K_n,)


def _safe_std_divide(adv: Tensor, r: Tensor) -> Tensor:
    """adv / std(r) per group; a constant group (std ~ 0) keeps its (zero) advantages as they are."""
    std = r.std(dim=-1, keepdim=True)  # (N, 1), unbiased, as torch.std and TRL's GRPO
    return torch.where(std > 1e-6, adv / std.clamp_min(1e-6), adv)  # (N, K)


def leave_one_out(rewards: Rewards, normalize: str | None = None) -> Rewards:
    """Leave-one-out advantages (Eq. 3): each rollout's reward minus the mean of the other K-1, which
    equals K/(K-1) * (R_k - mean(R)). The baseline of rollout k does not depend on R_k, so the policy
    gradient stays unbiased (unlike GRPO's mean). normalize="std" divides by the group's reward std
    (the paper's "LOOP RwNorm" ablation). Returns advantages shaped as `rewards`.

    >>> leave_one_out(torch.tensor([[1.0, 0.0, 0.5, 0.0, 1.0, 0.25]]))
    tensor([[ 0.6500, -0.5500,  0.0500, -0.5500,  0.6500, -0.2500]])
    """
    if normalize not in (None, "std"):
        raise ValueError(f"normalize must be None or 'std', got {normalize!r}")

    def fn(r: Tensor) -> Tensor:  # r: (N, K)
        others_mean = (r.sum(dim=-1, keepdim=True) - r) / (r.shape[-1] - 1)  # (N, K): mean of the other K-1
        adv = r - others_mean  # (N, K)
        return _safe_std_divide(adv, r) if normalize == "std" else adv

    return _per_group(fn, rewards)


def grpo_advantages(rewards: Rewards) -> Rewards:
    """GRPO's estimator (Shao et al. 2024), the paper's baseline: (R_k - mean(R)) / std(R) per group.
    The mean includes R_k itself, which biases the baseline.

    >>> grpo_advantages(torch.tensor([[1.0, 0.0]]))
    tensor([[ 0.7071, -0.7071]])
    """
    return _per_group(lambda r: _safe_std_divide(r - r.mean(dim=-1, keepdim=True), r), rewards)


def keep_mask(advantages: Rewards, threshold: float = 0.01) -> Rewards:
    """Which trajectories LOOP trains on: those with |A| >= threshold (App. D). A group whose rollouts
    all got the same reward has A = 0 everywhere and is dropped whole.

    >>> keep_mask(torch.tensor([[0.65, -0.005, 0.0]]))
    tensor([[ True, False, False]])
    """
    if isinstance(advantages, Tensor):
        return advantages.abs() >= threshold  # same shape, bool
    return [a.abs() >= threshold for a in advantages]


def importance_weights(logp: Tensor, old_logp: Tensor, mask: Tensor, level: str = "token",
                       turn_ids: Tensor | None = None) -> Tensor:
    """pi_theta / pi_old at the granularity of the paper's ablations (Eq. 10, Fig. 2, Eq. 4/9).

    level="token":      w_t = exp(logp_t - old_logp_t), one ratio per token (LOOP, Eq. 10).
    level="turn":       the product of the token ratios within each agent turn, given to every
                        token of that turn (LOOP "turn" in Fig. 2 / Table 1).
    level="trajectory": the product over all agent tokens of the trajectory (the bandit view of
                        Eq. 4/9, "LOOP (bandit)" in Table 1).
    Products are sums of log-ratios, exponentiated once. Positions outside `mask` get weight 1 and
    no gradient. logp, old_logp: (B, T) log-probs of the sampled tokens, current / sampling policy;
    mask: (B, T) bool, True on agent tokens; turn_ids: (B, T) long, each token's agent turn (any value
    off the mask), needed for level="turn". Returns weights (B, T).

    >>> lp, m = torch.log(torch.tensor([[2.0, 3.0, 0.5, 1.0]])), torch.tensor([[True, True, True, False]])
    >>> importance_weights(lp, torch.zeros(1, 4), m, "turn", torch.tensor([[0, 0, 1, -1]]))
    tensor([[6.0000, 6.0000, 0.5000, 1.0000]])
    >>> importance_weights(lp, torch.zeros(1, 4), m, "trajectory")
    tensor([[3., 3., 3., 1.]])
    """
    log_ratio = torch.where(mask, logp - old_logp, 0.0)  # (B, T); NaN at masked positions is dropped here
    if level == "token":
        summed = log_ratio  # (B, T)
    elif level == "trajectory":
        summed = log_ratio.sum(dim=1, keepdim=True).expand_as(log_ratio)  # (B, T)
    elif level == "turn":
        if turn_ids is None:
            raise ValueError("level='turn' needs turn_ids: the agent turn index of each token")
        turn = torch.where(mask, turn_ids, 0).long()  # (B, T), valid index everywhere
        n_turns = int(turn.max()) + 1 if turn.numel() else 1
        per_turn = log_ratio.new_zeros(len(log_ratio), n_turns).scatter_add(1, turn, log_ratio)  # (B, n_turns): sums
        summed = per_turn.gather(1, turn)  # (B, T): each token gets its turn's sum
    else:
        raise ValueError(f"level must be 'token', 'turn' or 'trajectory', got {level!r}")
    return torch.where(mask, summed.exp(), 1.0)  # (B, T)


def g_eps(advantages: Tensor, eps: float, clip: str = "paper") -> Tensor:
    """The clipped objective's ceiling for a trajectory with advantage A (Eq. 4).

    paper:    g(A) = A + eps*|A|, i.e. (1+eps)*A for A >= 0 and (1-eps)*A for A < 0: PPO's
              min(w*A, clip(w, 1-eps, 1+eps)*A) written without the ratio.
    official: the official code's asymmetric range [1/(1+eps), 1+eps]: (1+eps)*A for A >= 0 and
              A/(1+eps) for A < 0.

    >>> g_eps(torch.tensor([1.0, -1.0]), 0.1)
    tensor([ 1.1000, -0.9000])
    """
    if clip == "paper":
        return advantages + eps * advantages.abs()
    if clip == "official":
        return torch.where(advantages >= 0, (1 + eps) * advantages, advantages / (1 + eps))
    raise ValueError(f"clip must be 'paper', 'official' or 'none', got {clip!r}")


def clipped_surrogate(weights: Tensor, advantages: Tensor, eps: float = 0.1,
                      clip: str = "paper") -> Tensor:
    """Per-token PPO objective min(w*A, g_eps(A)) (Eq. 4 / Eq. 10), to be maximised.

    Where w*A exceeds g_eps(A) the minimum is the constant g_eps(A) and the token gets no gradient:
    the update stops pushing once the ratio has moved eps away from 1 in the advantage's direction.
    clip="none" returns w*A, the plain importance-weighted policy gradient (RLOO when on-policy).

    weights: (B, T).  advantages: (B,), one per trajectory.  Returns (B, T).

    >>> clipped_surrogate(torch.tensor([[1.0, 1.5, 0.5]]), torch.tensor([2.0]))
    tensor([[2.0000, 2.2000, 1.0000]])
    """
    adv = advantages.reshape(-1, 1)  # (B, 1), broadcast over positions
    unclipped = weights * adv  # (B, T)
    if clip == "none":
        return unclipped
    return torch.minimum(unclipped, g_eps(adv, eps, clip))  # (B, T)


@dataclass
class LossStats:
    """Detached diagnostics of one loss evaluation, all over agent tokens."""
    approx_kl: Tensor  # () k3 estimator of KL(pi_old || pi_theta): mean of (r - 1) - log r
    clip_frac: Tensor  # () share of agent tokens whose objective is clipped (no gradient)
    ratio_mean: Tensor  # () mean importance weight
    ratio_max: Tensor  # () largest importance weight
    agent_tokens: Tensor  # () number of agent tokens


def loop_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, eps: float = 0.1,
              level: str = "token", clip: str = "paper", turn_ids: Tensor | None = None,
              num_trajectories: float | None = None) -> tuple[Tensor, LossStats]:
    """The negative LOOP objective of Eq. 10 for a batch of trajectories, and diagnostics.

    Each trajectory's clipped objective is averaged over its own agent tokens (1/|a(x)|), so a long
    trajectory weighs as much as a short one; then the trajectories are averaged. A trajectory with
    no agent tokens contributes 0 and still counts in the average. num_trajectories: the divisor of
    that average (default B); a micro-batch passes its minibatch's size per rank, so that the
    micro-batches' gradients add up to the minibatch's.

    logp, old_logp: (B, T) log-probs of the tokens, current and sampling policy (old_logp detached).
    advantages: (B,).  mask: (B, T) bool, True on agent tokens.  turn_ids: (B, T), for level="turn".
    """
    old_logp = old_logp.detach()
    w = importance_weights(logp, old_logp, mask, level, turn_ids)  # (B, T)
    objective = clipped_surrogate(w, advantages, eps, clip)  # (B, T)
    objective = torch.where(mask, objective, 0.0)  # (B, T): exactly zero off the agent's tokens
    n_tokens = mask.sum(dim=1)  # (B,)
    per_trajectory = objective.sum(dim=1) / n_tokens.clamp_min(1)  # (B,): 1/|a(x)| sum_t
    denominator = per_trajectory.shape[0] if num_trajectories is None else num_trajectories
    loss = -per_trajectory.sum() / max(denominator, 1)  # () negated: optimisers minimise

    with torch.no_grad():
        log_r = torch.where(mask, logp - old_logp, 0.0)  # (B, T) token log-ratios
        n = mask.sum().clamp_min(1)  # ()
        clipped = mask & (objective < w * advantages.reshape(-1, 1))  # (B, T): the min took g_eps(A)
        stats = LossStats(  # k3: http://joschu.net/blog/kl-approx.html
            approx_kl=torch.where(mask, log_r.exp() - 1 - log_r, 0.0).sum() / n,
            clip_frac=clipped.sum() / n,
            ratio_mean=torch.where(mask, w, 0.0).sum() / n,
            ratio_max=torch.where(mask, w, -torch.inf).max() if mask.any() else w.new_ones(()),
            agent_tokens=mask.sum(),
        )
    return loss, stats
