"""Scripted episodes through a real EnvPool: the mini-world's solutions (show_episode, warm_start)
or any other turns (the tests' no-op and wrong-answer episodes).

    python -m mini_world.play likesong_1 [--prompt short]   # print an episode of a scripted solution
"""
import argparse
import time

import torch
from tqdm import tqdm

import model as M
import rollout
from appworld_env import DEFAULT_ROOT, PROMPTS, EnvPool, StepResult
from mini_world.scenarios import solution

NO_CODE = "I am not sure what to do."  # the turn played once a script has run out and its episode goes on


def play_solutions(envs, task_ids: list[str], scripts: list[list[str]] | None = None
                   ) -> list[tuple[list[dict], list[tuple[str, StepResult]]]]:
    """Play each task's script (by default its scripted solution) through the pool, len(envs) tasks at
    a time, all live slots stepping together. A script that runs out before its episode ends is
    followed by NO_CODE turns until it does (complete_task or the interaction limit), so every episode
    is scored. Returns, per task, its opening messages and the (turn, StepResult) of each step."""
    scripts = [solution(t) for t in task_ids] if scripts is None else scripts
    played = []
    for start in range(0, len(task_ids), len(envs)):
        chunk, todo = task_ids[start:start + len(envs)], scripts[start:start + len(envs)]
        slots = list(range(len(chunk)))
        openings, steps = envs.reset(slots, chunk), [[] for _ in chunk]
        while slots:
            texts = [todo[s][len(steps[s])] if len(steps[s]) < len(todo[s]) else NO_CODE for s in slots]
            for s, text, result in zip(slots, texts, envs.step(slots, texts)):
                steps[s].append((text, result))
            slots = [s for s in slots if not steps[s][-1][1].done]
        played += zip(openings, steps)
    return played


def scripted_episodes(tokenizer, envs, task_ids: list[str]) -> list[rollout.Episode]:
    """Each task's scripted solution as a rollout.Episode laid out as rollout.collect lays one out (our
    own text, so tokenising it is fine): warm_start learns from them. Failed scripts go."""
    episodes = []
    for task_id, (messages, steps) in zip(task_ids, play_solutions(envs, task_ids)):
        e = rollout.Episode(task_id=task_id)
        e.append(rollout.prompt_ids(tokenizer, messages))
        for text, r in steps:
            ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
            e.append(ids, agent=True, logprobs=[0.0] * len(ids))
            e.num_turns += 1
            if not r.done:
                e.append(rollout.observation_ids(tokenizer, r.observation))
        e.record(steps[-1][1])  # the final StepResult: reward, success, tests, info
        episodes.append(e)
    return [e for e in episodes if e.success]


def warm_start(model, tokenizer, envs, task_ids, device, *, epochs, lr, micro_batch, grad_clip, log) -> None:
    """Supervised epochs on the mini-world's scripted solutions before RL (the paper's SFT-GT idea; the
    small offline model almost never writes a working cell without it): mean NLL of the agent tokens."""
    episodes = scripted_episodes(tokenizer, envs, task_ids)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batch = rollout.collate(episodes, tokenizer.pad_token_id).to(device)
    for epoch in range(epochs):
        total, t0 = 0.0, time.time()
        chunks = torch.randperm(len(episodes)).split(micro_batch)
        for rows in tqdm(chunks, desc=f"warm start {epoch + 1}/{epochs}", leave=False, disable=not M.is_rank0()):
            mb = batch.select(rows)
            logp = M.token_logprobs(model, mb.input_ids, mb.attention_mask, positions=mb.agent_mask)  # (b, T-1)
            nll = -torch.where(mb.agent_mask, logp, 0.0).sum() / mb.agent_mask.sum().clamp_min(1)  # () per agent token
            nll.backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            total += nll.item() * len(rows)
        log(dict(phase="warm_start", epoch=epoch + 1, episodes=len(episodes), nll=total / len(episodes),
                 seconds=time.time() - t0))


def show_episode(task_id: str, root: str = DEFAULT_ROOT, prompt: str = "paper") -> None:
    """Print a mini-world task's episode played by its scripted solution: what the agent sees, what it
    writes, and how AppWorld scores it."""
    with EnvPool(1, root, prompt=prompt) as pool:
        [(messages, steps)] = play_solutions(pool, [task_id])
    for message in messages:
        print(f"----- {message['role']}\n{message['content']}")
    for turn, result in steps:
        print(f"----- assistant\n{turn}\n----- user (observation)\n{result.observation}")
    print(f"----- done: reward {result.reward}, success {result.success}, "
          f"{result.pass_count}/{result.num_tests} tests passed")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Print a mini-world task's episode played by its scripted solution.")
    parser.add_argument("task_id", help="e.g. likesong_1 (mini_world/README.md lists the tasks)")
    parser.add_argument("--root", default=DEFAULT_ROOT, help="AppWorld root holding the mini-world")
    parser.add_argument("--prompt", default="paper", choices=tuple(PROMPTS))
    args = parser.parse_args()
    show_episode(args.task_id, args.root, args.prompt)
