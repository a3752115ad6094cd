"""Measure the paper's memory claim and our own speed, each figure a ratio against a baseline
measured in the same run (issue 4).

    python bench.py                      # everything, tiny model and SmolLM2-135M (< 15 min on 2 CPU cores)
    python bench.py --quick              # a ~2 minute subset (mostly the tiny model)
    python bench.py --only 1,5 --json runs/bench.json --threads 2
    python bench.py --env [--slots 4] [--rounds 3]   # the environment alone: EnvPool's start, reset, step, score

The figures (goal in brackets):
 1. Memory claim: peak memory of one LOOP update (train.ppo_update: old log-probs recompute, loss,
    backward, optimizer step) / one supervised step (NLL of the same agent tokens, same batch, LoRA,
    micro-batching, gradient checkpointing). Two SFT baselines: the same chunked log-probs
    (model.token_logprobs, what our warm start does) and the plain HF way (`model(labels=...)`, full
    logits). The peer: one step of TRL's GRPOTrainer (beta=0, same model, LoRA, token counts;
    its step includes generating the completions; its chunked LM head works in chunks of 32,768
    tokens, so on this 3,072-token batch it is one chunk). [LOOP / SFT <= 1.00; LOOP below TRL]
 2. Chunked log-probs: peak memory and time of a forward + backward through model.token_logprobs
    / through log_softmax over the full (T, V) logits, at T = 1k, 4k, 8k, V = 49,152 (SmolLM2's
    tokenizer) on the tiny model. [memory <= 0.1 at 8k; time <= 1.2]
 3. Sampling: new tokens/s of rollout.collect running K=6 episodes of several tasks together / the
    same kind of episodes one at a time with plain HF `generate` (batch 1). The environment has the
    EnvPool surface but answers instantly, so this measures sampling only. The share of the time
    spent in prompt passes (prefill: each turn re-reads the whole conversation) is shown, because
    batching speeds up only the one-token decode steps. [>= 4x at 24 episodes]
 4. Learning throughput: FLOP/s of a LOOP update / FLOP/s of a large float32 torch.mm, same process,
    same threads. FLOPs of an update = (2 old log-probs + 2 forward + 2 recompute + 2 input
    gradients + 2 weight gradients of trained dense weights) x N x T, where N = parameters on the
    path of a token (decoder layers incl. LoRA, plus the LM head; not the embedding lookup), T = the
    tokens of the batch; with LoRA the last term is only LoRA's (tiny), so ~8 N T. Attention's
    T^2 terms are left out (a few % at 512 tokens). [>= 0.4 of matmul peak]
 5. FSDP: parameter + gradient + optimizer-state bytes held per rank, 2 ranks (gloo, mp spawn) /
    1 rank, after one step. [<= 0.55]
 6. Where one offline-default iteration's time goes (SmolLM2 on the mini-world, small settings):
    sampling vs environment (EnvPool.reset/step, wrapped) vs old log-probs vs the PPO update.
 7. bfloat16 learning (train.py's --dtype auto where model.fast_bf16 says so): time of one LOOP
    update (the figure 1 batch) with float32 LoRA weights on a bfloat16 base / everything in float32,
    each the second of two updates in its process (the first pays for building the kernels).
    [< 1.00 for SmolLM2 where fast_bf16; none for the tiny model]
 8. bfloat16 sampling (the same setting): new tokens/s of rollout.collect (24 episodes, the figure 3
    setting) from the same model, float32 LoRA on a bfloat16 base / everything in float32; each the
    second of two collects in its process. [> 1.00 for SmolLM2 where fast_bf16; none for the tiny model]
 9. Micro-batches by length (train.by_length): time of one LOOP update of 12 episodes of unequal
    lengths (the figure 7 layout, each cut to 208-512 tokens), micro-batches of 6 cut from the rows
    sorted by length / in the minibatch's drawn order. The gradient is the same; less padding is
    computed. [< 1.00]

GPU figures (python bench.py --gpu, one CUDA GPU; README "Checking on a GPU"). Models in Qwen2.5's
shapes with random bf16 weights, LoRA r=16 and gradient checkpointing as train.py sets them up; all
in one process; numbers to runs/bench_gpu.json, each row naming the GPU:
 G1. Sampling, Qwen2.5-7B shape: new tokens/s of rollout.collect (32 episodes, K=8, 2 turns of 128
     tokens) / HF generate on the same conversations, batched, each turn re-reading the conversation.
 G2. One LOOP update, Qwen2.5-7B shape, one episode of 8K, 16K and 32K tokens per micro-batch: time
     and peak memory (torch.cuda.max_memory_allocated, weights included) / an SFT step on the same
     tokens through the same chunked log-probs, and through HF's full logits. [memory <= 1.00]
 G3. Does the paper's model fit the one-copy design: the largest N of live 8K-token episodes that
     rollout.collect samples beside a Qwen2.5-32B-shaped model's weights (61 GiB) on this GPU, found by
     bisection on out-of-memory errors, / N if the KV cache were held once (arithmetic); and, computed,
     what an H100 80GB and an H200 141GB allow.

Memory: every measurement runs in a fresh spawned process. On CPU it is the peak RSS of that
process during the measured step (Linux: /proc/self/clear_refs resets VmHWM after set-up), shown
as "peak (+ above the RSS before the step)"; on GPU torch.cuda.max_memory_allocated. Memory
processes run with MALLOC_MMAP_THRESHOLD_=1 MB, so that RSS follows the live tensors (glibc's
default heap keeps freed blocks: see MEMORY_ENV); --glibc-default measures without it.
Threads: --threads (default: all cores) in every process, baselines included.
"""
import argparse
import dataclasses
import gc
import json
import multiprocessing as mp
import os
import platform
import re
import resource
import sys
import tempfile
import time
import traceback

import torch

import appworld_env
import model as M
import rollout
import train
from mini_world.build import setup_mini_world

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


# ---------------------------------------------------------------------------------- memory


def _status_kb(key):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+)", f.read(), re.M).group(1))


def current_mb():
    if CUDA:
        return torch.cuda.memory_allocated() / 2**20
    return _status_kb("VmRSS") / 1024


def reset_peak():
    """Start a new peak: what the measured step adds, not what loading the model needed."""
    gc.collect()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS (Linux >= 4.0)
    except OSError:
        pass  # then peak_mb() is the whole process's peak, set-up included


def peak_mb():
    if CUDA:
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        return _status_kb("VmHWM") / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def measured(fn):
    """Run fn() once; its time and the peak memory of this process while it ran (MB)."""
    base = current_mb()
    reset_peak()
    t0 = time.perf_counter()
    out = fn()
    if CUDA:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = peak_mb()
    return out, dict(peak_mb=peak, base_mb=base, above_mb=peak - base, seconds=seconds)


# --------------------------------------------------------------------------- fresh processes


def _child_main(conn, name, kwargs, threads):
    torch.set_num_threads(threads)
    try:
        conn.send(("ok", globals()[name](**kwargs)))
    except BaseException:
        conn.send(("error", traceback.format_exc(limit=6)))
    finally:
        conn.close()


# glibc keeps freed blocks below its (adaptive, up to 32 MB) mmap threshold in its heap, so a
# training step's peak RSS is ~3x its live tensors (SmolLM2, 6x512 tokens: 4.2 GB vs 1.5 GB).
# Memory children serve every block >= 1 MB by mmap, which is returned on free: RSS then follows
# the tensors. (--glibc-default turns this off; timing children never use it.)
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}


def in_fresh_processes(name, kwargs_list, threads, timeout=900, env=None):
    """Run the module function `name` once per kwargs, each in its own spawned process, all at once
    (one per rank for FSDP; otherwise a list of one), with `env` added to their environment.
    Returns their results, or {"error": ...} for each that failed."""
    ctx = mp.get_context("spawn")
    procs = []
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        for kwargs in kwargs_list:
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child_main, args=(child, name, kwargs, threads))
            p.start()
            child.close()
            procs.append((p, parent))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    results, deadline = [], time.monotonic() + timeout
    for p, conn in procs:
        if conn.poll(max(0.0, deadline - time.monotonic())):
            try:
                status, value = conn.recv()
            except EOFError:
                status, value = "error", "the process died (out of memory?)"
        else:
            status, value = "error", f"no answer within {timeout} s"
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()
        if status == "error" and p.exitcode not in (0, None):
            value += f" (exit code {p.exitcode})"
        results.append(value if status == "ok" else {"error": value})
    return results


def in_fresh_process(name, threads, env=None, **kwargs):
    return in_fresh_processes(name, [kwargs], threads, env=env)[0]


# ------------------------------------------------------------------------------ shared set-up


def load_model(name, lora=True, checkpointing=True, bf16=False):
    """'tiny' (hidden 64, 2 layers, SmolLM2's 49k vocabulary) or 'smol' (SmolLM2-135M-Instruct),
    float32 on CPU (bf16: a bfloat16 base; LoRA stays float32), in the training setting of train.py."""
    torch.manual_seed(0)
    model, tokenizer = M.load(tiny=name == "tiny", device=DEVICE, dtype=torch.bfloat16 if bf16 else None)
    if lora:
        M.add_lora(model)
    if checkpointing:
        M.enable_gradient_checkpointing(model)
    with torch.no_grad():  # read every weight once: transformers maps the checkpoint file lazily, and the
        sum(p.sum() for p in model.parameters())  # RSS before a step should hold the whole model
    return model, tokenizer


def trainable_path_params(model):
    """N of the FLOP formula: decoder layers (LoRA included) plus the LM head; and the trained dense
    (non-LoRA) parameters among them, whose weight gradients cost another 2 N T."""
    layers = list(M.decoder_layers(model).parameters())
    head = model.get_output_embeddings().weight
    n = sum(p.numel() for p in layers) + head.numel()
    dense_trained = sum(p.numel() for p in layers if p.requires_grad and p.dim() == 2 and p.shape[0] > 64 and p.shape[1] > 64)
    if any(p.requires_grad for p in model.get_output_embeddings().parameters()):
        dense_trained += head.numel()
    return n, dense_trained


# Sizes of one synthetic LOOP batch: the offline default's micro-batch (6 trajectories) of 512 tokens,
# each a prompt, then two agent turns with an observation between them: 256 agent tokens each.
PROMPT, TURNS = 192, ((128, 64), (128, 0))  # prompt tokens; (agent, observation) tokens per turn
SEQ = PROMPT + sum(a + o for a, o in TURNS)  # 512
AGENT = sum(a for a, _ in TURNS)  # 256


def synthetic_episodes(tokenizer, n, seed=0):
    """n rollout.Episodes of SEQ random tokens in the layout above, K=6 per task, with rewards whose
    leave-one-out advantages are all nonzero (so the |A| filter keeps every one)."""
    g = torch.Generator().manual_seed(seed)

    def ids(k):
        return torch.randint(100, len(tokenizer), (k,), generator=g).tolist()  # ordinary tokens, no specials

    rewards = [1.0, 0.0, 0.5, 0.0, 1.0, 0.25]
    episodes = []
    for i in range(n):
        e = rollout.Episode(task_id=f"synthetic_{i // 6}")
        e.append(ids(PROMPT))
        for agent, obs in TURNS:
            e.append(ids(agent), agent=True, logprobs=[-1.0] * agent)
            e.num_turns += 1
            if obs:
                e.append(ids(obs))
        e.reward = rewards[i % 6]
        episodes.append(e)
    return episodes


def advantages(episodes):
    adv, keep = train.advantages_for(episodes, 6, "loop", 0.01)
    assert all(keep), "every synthetic trajectory should survive the filter"
    return adv


def matmul_flops(n=2048, min_seconds=1.0):
    """FLOP/s of a float32 (n x n) @ (n x n) torch.mm on this device and thread setting."""
    a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
    torch.mm(a, b)  # warm-up
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        torch.mm(a, b)
        reps += 1
    if CUDA:
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


# ------------------------------------------------------------------- figure 1 and 4: children


def update_setup(model_name, n, micro, bf16=False):
    """What one LOOP update needs: the model, n synthetic episodes, their advantages, train.Args for
    1 epoch of one minibatch of n in micro-batches of `micro`, and AdamW over the trainable weights."""
    model, tokenizer = load_model(model_name, bf16=bf16)
    episodes = synthetic_episodes(tokenizer, n)
    args = train.Args(epochs=1, minibatch=n, micro_batch=micro, lr=1e-4)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    return model, episodes, advantages(episodes), args, opt


def loop_update_child(model_name, n, micro, time_it=False):
    """One LOOP update through train.ppo_update (1 epoch, one minibatch of n, micro-batches of
    `micro`): its peak memory and time; with time_it also its FLOP/s and torch.mm's."""
    model, episodes, adv, args, opt = update_setup(model_name, n, micro)
    stats, out = measured(lambda: train.ppo_update(model, opt, episodes, adv, episodes[0], args, 1, DEVICE))
    assert stats["optimizer_steps"] == 1, stats
    if time_it:
        tokens = n * SEQ
        N, dense_trained = trainable_path_params(model)
        flops = (8 * N + 2 * dense_trained) * tokens
        out.update(tokens=tokens, N=N, dense_trained=dense_trained, tokens_per_s=tokens / out["seconds"],
                   flops_per_s=flops / out["seconds"], matmul_flops_per_s=matmul_flops())
    return out


def sft_step(model, batch, opt, micro, head, agent_only=False):
    """One supervised step on a rollout.Batch: NLL of the agent tokens, micro-batched, clipped, AdamW.
    head="chunked": model.token_logprobs, with agent_only through the LM head at the agent's tokens
    only (as mini_world.play.warm_start and the LOOP update do); "full": HF's model(labels=...)."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = len(batch.rewards)
    for rows in torch.arange(n).split(micro):
        mb = batch.select(rows)
        if head == "chunked":
            logp = M.token_logprobs(model, mb.input_ids, mb.attention_mask,
                                    positions=mb.agent_mask if agent_only else None)  # (b, T-1)
            loss = -torch.where(mb.agent_mask, logp, 0.0).sum() / mb.agent_mask.sum() * len(rows) / n  # ()
        else:
            # HF shifts labels itself: label t is the target of position t-1; -100 is ignored.
            is_agent = torch.cat([torch.zeros_like(mb.agent_mask[:, :1]), mb.agent_mask], dim=1)  # (b, T)
            labels = mb.input_ids.masked_fill(~is_agent, -100)  # (b, T)
            loss = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, labels=labels).loss * len(rows) / n
        loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def sft_step_child(model_name, n, micro, head):
    """One supervised step (sft_step) on the figure 1 batch."""
    model, tokenizer = load_model(model_name)
    batch = rollout.collate(synthetic_episodes(tokenizer, n), tokenizer.pad_token_id).to(DEVICE)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
    return measured(lambda: sft_step(model, batch, opt, micro, head))[1]


def trl_grpo_child(model_name, n):
    """One step of TRL's GRPOTrainer, beta=0 (no reference model), on our LoRA'd, checkpointed model:
    one prompt of PROMPT tokens, n=6 generations forced to AGENT tokens each (SEQ tokens per
    sequence, as the LOOP batch). Includes generating the completions."""
    import datasets
    import trl

    model, tokenizer = load_model(model_name)
    g = torch.Generator().manual_seed(0)
    prompt = tokenizer.decode(torch.randint(100, len(tokenizer), (PROMPT,), generator=g).tolist())
    data = datasets.Dataset.from_dict({"prompt": [prompt] * 4})
    config = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"), beta=0.0, num_generations=n,
        per_device_train_batch_size=n, max_completion_length=AGENT, temperature=1.0,
        generation_kwargs=dict(min_new_tokens=AGENT, top_k=0, top_p=1.0),  # every completion AGENT tokens
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        learning_rate=1e-4, max_steps=1, use_cpu=not CUDA, bf16=False, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [float(len(c) % 3) for c in completions],
                              args=config, train_dataset=data, processing_class=tokenizer)
    _, out = measured(trainer.train)
    out["trl_version"] = trl.__version__
    return out


# ------------------------------------------------------------------------- figure 2: children


def logprobs_child(model_name, T, method):
    """Forward + backward of the log-probs of one sequence of T tokens: model.token_logprobs
    ("chunked") or log_softmax over the full (T, V) logits ("full"). Tiny model: every parameter
    trains; SmolLM2: LoRA. Both with gradient checkpointing. A warm-up run first, then measured."""
    model, _ = load_model(model_name, lora=model_name != "tiny")
    V = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(100, V, (1, T), device=DEVICE)  # (1, T)
    mask = torch.ones_like(ids)  # (1, T)

    def run():
        if method == "chunked":
            logp = M.token_logprobs(model, ids, mask)  # (1, T-1)
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits  # (1, T, V)
            logp = torch.log_softmax(logits.float(), dim=-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (1, T-1)
        logp.sum().backward()
        model.zero_grad(set_to_none=True)

    run()
    return dict(**measured(run)[1], vocab=V)


# ------------------------------------------------------------------------- figure 3: children


class InstantEnv:
    """The EnvPool surface (len, reset, step) answering at once: every episode has `turns` turns,
    the observation is a short fixed text. With it, rollout timings measure sampling alone."""

    def __init__(self, size, turns):
        self.size, self.turns, self.turn = size, turns, {}

    def __len__(self):
        return self.size

    def reset(self, slots, task_ids):
        info = {"datetime": "2023-05-18T12:00:00", "instruction": "How many songs are in my Spotify library?",
                "supervisor": {"first_name": "Ada", "last_name": "Lin", "email": "ada@example.org", "phone_number": "5550100"}}
        for s in slots:
            self.turn[s] = 0
        return [appworld_env.opening_messages({**info, "instruction": f"{info['instruction']} ({t})"}, "short")
                for t in task_ids]

    def step(self, slots, texts):
        out = []
        for s in slots:
            self.turn[s] += 1
            done = self.turn[s] >= self.turns
            out.append(appworld_env.StepResult("Execution successful.", done, reward=float(done) * (s % 2)))
        return out


def sampling_child(model_name, episode_counts, k, max_new_tokens, turns, sequential_episodes):
    """New tokens/s: rollout.collect with all episodes live at once, for each count; and plain HF
    generate, batch 1, one episode after another (`sequential_episodes` of them: the rate at batch 1
    does not depend on how many episodes follow each other)."""
    model, tokenizer = load_model(model_name, lora=True, checkpointing=False)
    model.eval()
    torch.manual_seed(0)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out = {}
    clock = dict(prefill=0.0, decode=0.0)  # time in the model's forward: prompt passes vs one-token steps
    forward = model.forward

    def timed_forward(*a, **kw):
        t0 = time.perf_counter()
        try:
            return forward(*a, **kw)
        finally:
            ids = kw.get("input_ids", a[0] if a else None)
            clock["prefill" if ids is not None and ids.shape[1] > 1 else "decode"] += time.perf_counter() - t0

    model.forward = timed_forward  # nn.Module.__call__ looks the instance attribute up first

    env = InstantEnv(1, turns)
    new_tokens, t0 = 0, time.perf_counter()
    for i in range(sequential_episodes):
        ids = rollout.prompt_ids(tokenizer, env.reset([0], [f"task_{i // k}"])[0])
        for _ in range(turns):
            x = torch.tensor([ids], device=DEVICE)  # (1, L)
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=True,
                               temperature=1.0, top_k=0, top_p=1.0, eos_token_id=eos, pad_token_id=pad)  # (1, L + new)
            new = y[0, x.shape[1]:].tolist()
            new_tokens += len(new)
            r = env.step([0], [tokenizer.decode(new, skip_special_tokens=True)])[0]
            if r.done:
                break
            ids = ids + new + ([] if new[-1] == eos else [eos]) + rollout.observation_ids(tokenizer, r.observation)
    seconds = time.perf_counter() - t0
    out["generate_b1"] = dict(episodes=sequential_episodes, new_tokens=new_tokens, seconds=seconds,
                              tokens_per_s=new_tokens / seconds, **clock)

    for count in episode_counts:
        clock.update(prefill=0.0, decode=0.0)
        env = InstantEnv(count, turns)
        tasks = [f"task_{i}" for i in range(count // k)]
        t0 = time.perf_counter()
        episodes = rollout.collect(model, tokenizer, env, tasks, k, max_new_tokens=max_new_tokens, progress=False)
        seconds = time.perf_counter() - t0
        new_tokens = sum(sum(e.agent_mask) for e in episodes)
        out[f"collect_{count}"] = dict(episodes=count, new_tokens=new_tokens, seconds=seconds,
                                       tokens_per_s=new_tokens / seconds, **clock)
    return out


# ------------------------------------------------------------------------- figure 5: children


def fsdp_child(rank, world_size, port, model_name, lora):
    """Bytes of parameters, gradients and AdamW state this rank holds after one training step
    (FSDP2 through model.shard when world_size > 1)."""
    import torch.distributed as dist
    from datetime import timedelta

    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=300))
    try:
        model, tokenizer = load_model(model_name, lora=lora)
        model = M.shard(model)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        ids = torch.randint(100, len(tokenizer), (2, 64), device=DEVICE)  # (2, 64)
        logp = M.token_logprobs(model, ids, torch.ones_like(ids))  # (2, 63)
        (-logp.mean()).backward()
        opt.step()

        def nbytes(t):
            t = t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard on this rank
            return t.numel() * t.element_size()

        return dict(param_bytes=sum(nbytes(p) for p in model.parameters()),
                    grad_bytes=sum(nbytes(p.grad) for p in model.parameters() if p.grad is not None),
                    optim_bytes=sum(nbytes(v) for s in opt.state.values() for v in s.values()
                                    if torch.is_tensor(v) and v.dim() > 0))
    finally:
        if world_size > 1:
            dist.destroy_process_group()


# ------------------------------------------------------------------------- figure 6: children


def iteration_child(model_name, flags, warm_slots=True):
    """One LOOP iteration as train.main runs it (collect, advantages, filter, ppo_update) on the
    mini-world, timing the environment (EnvPool.reset/step, wrapped), the old log-probs
    (train.old_logprobs, wrapped) and the rest."""
    import random

    args = train.parse_args(flags)
    model, tokenizer = load_model(model_name, lora=args.lora_rank > 0, checkpointing=args.gradient_checkpointing)
    setup_mini_world(args.appworld_root)
    tasks = appworld_env.load_task_ids(args.train_split, args.appworld_root,
                                       difficulties=tuple(int(d) for d in args.difficulties.split(",")))
    envs = appworld_env.EnvPool(args.env_workers, args.appworld_root, max_interactions=args.max_interactions,
                                reward=args.reward, prompt=args.prompt, tokenizer=tokenizer,
                                max_obs_tokens=args.max_obs_tokens)
    clock = dict(env=0.0, old_logprobs=0.0)

    def timed(fn, key):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                clock[key] += time.perf_counter() - t0
        return wrapper

    try:
        if warm_slots:  # a worker's first world costs ~3 s once: not part of an iteration
            envs.reset(list(range(len(envs))), [tasks[i % len(tasks)] for i in range(len(envs))])
        envs.reset, envs.step = timed(envs.reset, "env"), timed(envs.step, "env")
        original_old_logprobs = train.old_logprobs
        train.old_logprobs = timed(original_old_logprobs, "old_logprobs")  # ppo_update looks it up here
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, eps=args.adam_eps)
        train.seed_everything(args.seed)
        draw = random.Random(args.seed * 7919).sample(tasks, min(args.tasks_per_iter, len(tasks)))
        t0 = time.perf_counter()
        model.eval()
        episodes = rollout.collect(model, tokenizer, envs, draw, args.k, temperature=args.temperature,
                                   max_new_tokens=args.max_new_tokens, max_seq_len=args.max_seq_len, progress=False)
        collect_s = time.perf_counter() - t0
        adv, keep = train.advantages_for(episodes, args.k, args.estimator, args.adv_threshold)
        kept = [(e, a) for e, a, k in zip(episodes, adv, keep) if k]
        note = f"{len(kept)} of {len(episodes)} trajectories kept by the abs(A) >= 0.01 filter"
        if not kept:  # nothing to learn from: time the update on every trajectory (A = 0) to show its cost
            kept, note = list(zip(episodes, adv)), note + "; update timed on all of them (A = 0)"
        t0 = time.perf_counter()
        model.train()
        upd = train.ppo_update(model, optimizer, [e for e, _ in kept], [a for _, a in kept], episodes[0], args, 1, DEVICE)
        update_s = time.perf_counter() - t0
        train.old_logprobs = original_old_logprobs
    finally:
        envs.close()
    return dict(sampling=collect_s - clock["env"], environment=clock["env"], old_logprobs=clock["old_logprobs"],
                update=update_s - clock["old_logprobs"], note=note, episodes=len(episodes),
                new_tokens=sum(sum(e.agent_mask) for e in episodes),
                tokens=sum(len(e.token_ids) for e, _ in kept), trained_tokens=upd["trained_tokens"],
                reward=sum(e.reward for e in episodes) / len(episodes), flags=" ".join(flags))


# --------------------------------------------------------------------- figure 7 and 9: children


def update_time_child(model_name, n, micro, bf16, ragged=False, sort=True):
    """Seconds of the second of two LOOP updates (1 epoch, one minibatch of n) on a bfloat16 base or
    in float32; the first builds the kernels (oneDNN's bf16 ones take seconds).
    ragged: each episode cut to a length drawn uniformly from PROMPT+16..SEQ, as real episodes
    differ (figure 9); sort=False: micro-batches cut from the minibatch in its drawn order."""
    model, episodes, adv, args, opt = update_setup(model_name, n, micro, bf16)
    if ragged:
        g = torch.Generator().manual_seed(1)
        for e in episodes:
            cut = int(torch.randint(PROMPT + 16, SEQ + 1, (1,), generator=g))
            e.token_ids, e.agent_mask, e.turn_ids, e.sampler_logprobs = (
                e.token_ids[:cut], e.agent_mask[:cut], e.turn_ids[:cut], e.sampler_logprobs[:cut])
    if not sort:
        train.by_length = lambda batch, rows: list(rows)  # this process only
    seconds = []
    for _ in range(2):
        torch.manual_seed(0)  # the same drawn order in both processes
        t0 = time.perf_counter()
        stats = train.ppo_update(model, opt, episodes, adv, episodes[0], args, 1, DEVICE)
        if CUDA:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        assert stats["optimizer_steps"] == 1, stats
    return dict(seconds=seconds[-1], first_seconds=seconds[0])


# ------------------------------------------------------------------------- figure 8: children


def bf16_sampling_child(model_name, count, k, max_new_tokens, turns, bf16):
    """New tokens/s of the second of two rollout.collect calls (the first builds the kernels), from
    the LoRA model on a bfloat16 base or in float32."""
    model, tokenizer = load_model(model_name, lora=True, checkpointing=False, bf16=bf16)
    model.eval()
    tasks = [f"task_{i}" for i in range(count // k)]
    for _ in range(2):
        torch.manual_seed(0)
        t0 = time.perf_counter()
        episodes = rollout.collect(model, tokenizer, InstantEnv(count, turns), tasks, k,
                                   max_new_tokens=max_new_tokens, progress=False)
        if CUDA:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    new_tokens = sum(sum(e.agent_mask) for e in episodes)
    return dict(seconds=seconds, new_tokens=new_tokens, tokens_per_s=new_tokens / seconds)


# ------------------------------------------------------------------------------- the figures


def figure1_and_4(models, threads, env, rows, results):
    n, micro = 6, 6  # the offline default's micro-batch, one minibatch
    for name in models:
        loop_r = in_fresh_process("loop_update_child", threads, env, model_name=name, n=n, micro=micro)
        chunked = in_fresh_process("sft_step_child", threads, env, model_name=name, n=n, micro=micro, head="chunked")
        full = in_fresh_process("sft_step_child", threads, env, model_name=name, n=n, micro=micro, head="full")
        trl_r = in_fresh_process("trl_grpo_child", threads, env, model_name=name, n=n) if _trl_available() else \
            {"error": "trl is not installed (pip install trl; an optional extra)"}
        timed = in_fresh_process("loop_update_child", threads, model_name=name, n=n, micro=micro, time_it=True)
        results[f"fig1_{name}"] = dict(loop=loop_r, sft_chunked=chunked, sft_full_logits=full, trl_grpo=trl_r, fig4=timed,
                                       batch=f"{n} x {SEQ} tokens ({AGENT} agent), micro-batch {micro}, LoRA r=16, checkpointing")
        what = f"{n}x{SEQ} tok"
        rows.append(_row("1 memory", name, f"LOOP update / SFT step, same chunked log-probs ({what})",
                         loop_r, chunked, "peak_mb", "<= 1.00", lambda r: r <= 1.0, unit="MB"))
        rows.append(_row("1 memory", name, f"LOOP update / SFT step, HF full logits ({what})",
                         loop_r, full, "peak_mb", "<= 1.00", lambda r: r <= 1.0, unit="MB"))
        rows.append(_row("1 memory", name, f"LOOP update / TRL GRPO step, beta=0 ({what})",
                         loop_r, trl_r, "peak_mb", "< 1.00", lambda r: r < 1.0, unit="MB"))
        if "flops_per_s" in timed:
            ratio = timed["flops_per_s"] / timed["matmul_flops_per_s"]
            rows.append(dict(figure="4 learning", model=name,
                             what=f"LOOP update FLOP/s / torch.mm fp32 FLOP/s ({timed['tokens_per_s']:.0f} tok/s, N={timed['N'] / 1e6:.1f}M)",
                             value=f"{timed['flops_per_s'] / 1e9:.1f} GF/s", baseline=f"{timed['matmul_flops_per_s'] / 1e9:.1f} GF/s",
                             ratio=ratio, goal=">= 0.40", met=round(ratio, 2) >= 0.4))
        else:
            rows.append(dict(figure="4 learning", model=name, what="LOOP update FLOP/s / torch.mm", value="error",
                             baseline="", ratio=None, goal=">= 0.40", met=None))


def _trl_available():
    import importlib.util
    return importlib.util.find_spec("trl") is not None


def figure2(models, lengths, threads, env, rows, results):
    for name in models:
        for T in lengths[name]:
            chunked = in_fresh_process("logprobs_child", threads, env, model_name=name, T=T, method="chunked")
            full = in_fresh_process("logprobs_child", threads, env, model_name=name, T=T, method="full")
            results[f"fig2_{name}_{T}"] = dict(chunked=chunked, full=full)
            V = chunked.get("vocab", "?")
            rows.append(_row("2 log-probs", name, f"token_logprobs / full log_softmax, memory above RSS before, fwd+bwd, T={T}, V={V}",
                             chunked, full, "above_mb", "<= 0.10 at 8k" if T == 8192 else "",
                             (lambda r: r <= 0.1) if T == 8192 else None, unit="MB"))
            rows.append(_row("2 log-probs", name, f"  the same, time of forward+backward, T={T}",
                             chunked, full, "seconds", "<= 1.20", lambda r: r <= 1.2, unit="s"))


def figure3(models, settings, threads, rows, results):
    for name in models:
        s = settings[name]
        r = in_fresh_process("sampling_child", threads, model_name=name, **s)
        results[f"fig3_{name}"] = dict(r, settings=s)
        if "error" in r:
            rows.append(dict(figure="3 sampling", model=name, what="collect / generate b=1", value="error",
                             baseline="", ratio=None, goal=">= 4 at 24", met=None))
            continue
        base = r["generate_b1"]
        for count in s["episode_counts"]:
            c = r[f"collect_{count}"]
            ratio = c["tokens_per_s"] / base["tokens_per_s"]
            rows.append(dict(figure="3 sampling", model=name,
                             what=f"collect {count} episodes (K=6, {s['turns']} turns <= {s['max_new_tokens']} tok) / generate b=1 "
                                  f"(prefill {c['prefill'] / c['seconds']:.0%} / {base['prefill'] / base['seconds']:.0%} of the time)",
                             value=f"{c['tokens_per_s']:.0f} tok/s", baseline=f"{base['tokens_per_s']:.0f} tok/s",
                             ratio=ratio, goal=">= 4.0" if count == 24 else "",
                             met=(ratio >= 4.0) if count == 24 else None))


def figure5(models, threads, rows, results):
    port = 29500 + os.getpid() % 1000
    for name, lora in models:
        one = in_fresh_process("fsdp_child", threads, rank=0, world_size=1, port=port, model_name=name, lora=lora)
        # Two ranks share the cores: each gets half the threads (as torchrun's OMP_NUM_THREADS=1 would).
        two = in_fresh_processes("fsdp_child", [dict(rank=r, world_size=2, port=port, model_name=name, lora=lora)
                                                for r in range(2)], max(1, threads // 2))
        port += 1
        setting = "LoRA" if lora else "full FT"
        results[f"fig5_{name}_{setting}"] = dict(one_rank=one, two_ranks=two)
        if "error" in one or any("error" in t for t in two):
            rows.append(dict(figure="5 FSDP", model=name, what=f"bytes per rank, 2 ranks / 1 ({setting})",
                             value="error", baseline="", ratio=None, goal="<= 0.55", met=None))
            continue
        total = lambda r: r["param_bytes"] + r["grad_bytes"] + r["optim_bytes"]
        worst = max(total(t) for t in two)
        ratio = worst / total(one)
        rows.append(dict(figure="5 FSDP", model=name,
                         what=f"param+grad+optim bytes per rank, 2 ranks / 1 rank ({setting})",
                         value=f"{worst / 2**20:.1f} MB", baseline=f"{total(one) / 2**20:.1f} MB",
                         ratio=ratio, goal="<= 0.55", met=ratio <= 0.55))


def figure6(model_name, flags, threads, rows, results):
    r = in_fresh_process("iteration_child", threads, model_name=model_name, flags=flags)
    results[f"fig6_{model_name}"] = r
    if "error" in r:
        rows.append(dict(figure="6 iteration", model=model_name, what="time split", value="error", baseline="",
                         ratio=None, goal="", met=None))
        return
    total = sum(r[k] for k in ("sampling", "environment", "old_logprobs", "update"))
    for key in ("sampling", "environment", "old_logprobs", "update"):
        rows.append(dict(figure="6 iteration", model=model_name, what=f"{key} / the iteration ({r['episodes']} episodes)",
                         value=f"{r[key]:.1f} s", baseline=f"{total:.1f} s", ratio=r[key] / total, goal="", met=None,
                         note=r["note"] if key == "update" else None))


def figure7(models, threads, rows, results):
    n, micro = 6, 6  # figure 1's batch
    for name in models:
        bf16 = in_fresh_process("update_time_child", threads, model_name=name, n=n, micro=micro, bf16=True)
        fp32 = in_fresh_process("update_time_child", threads, model_name=name, n=n, micro=micro, bf16=False)
        results[f"fig7_{name}"] = dict(bf16=bf16, float32=fp32)
        fast = M.fast_bf16(DEVICE)
        goal = fast and name != "tiny"
        rows.append(_row("7 bf16", name, f"LOOP update time, bf16 base / float32 ({n}x{SEQ} tok; fast_bf16={fast})",
                         bf16, fp32, "seconds", "< 1.00" if goal else "", (lambda r: r < 1.0) if goal else None, unit="s"))


def figure8(models, settings, threads, rows, results):
    for name in models:
        s = dict(count=24, k=6, max_new_tokens=settings[name]["max_new_tokens"], turns=settings[name]["turns"])
        bf16 = in_fresh_process("bf16_sampling_child", threads, model_name=name, bf16=True, **s)
        fp32 = in_fresh_process("bf16_sampling_child", threads, model_name=name, bf16=False, **s)
        results[f"fig8_{name}"] = dict(bf16=bf16, float32=fp32, settings=s)
        fast = M.fast_bf16(DEVICE)
        goal = fast and name != "tiny"
        rows.append(_row("8 bf16 sampling", name, f"collect tok/s, bf16 base / float32 (24 episodes; fast_bf16={fast})",
                         bf16, fp32, "tokens_per_s", "> 1.00" if goal else "", (lambda r: r > 1.0) if goal else None,
                         unit="tok/s"))


def figure9(models, threads, rows, results):
    n, micro, bf16 = 12, 6, M.fast_bf16(DEVICE)  # the offline default's minibatch and micro-batch
    for name in models:
        s = dict(model_name=name, n=n, micro=micro, bf16=bf16, ragged=True)
        by_len = in_fresh_process("update_time_child", threads, sort=True, **s)
        drawn = in_fresh_process("update_time_child", threads, sort=False, **s)
        results[f"fig9_{name}"] = dict(sorted=by_len, drawn=drawn)
        rows.append(_row("9 sorted micro-batches", name, f"LOOP update time, rows sorted by length / drawn order ({n} episodes of "
                         f"{PROMPT + 16}-{SEQ} tok, micro-batch {micro})", by_len, drawn, "seconds", "< 1.00",
                         lambda r: r < 1.0, unit="s"))


def _row(figure, model_name, what, a, b, key, goal, check, unit=""):
    """A table row comparing a[key] / b[key]. Memory values show the total peak and, in brackets,
    the part above the process's RSS before the step. A goal is judged on the ratio as printed
    (2 decimals): RSS differs by a few MB between identical runs."""
    if "error" in a or "error" in b or key not in a or key not in b:
        why = (a.get("error") or b.get("error") or "missing")[-400:]
        return dict(figure=figure, model=model_name, what=what, value="error", baseline="", ratio=None, goal=goal,
                    met=None, error=why)
    ratio = a[key] / b[key] if b[key] else float("nan")
    if unit == "MB":
        fmt = lambda r: f"{r['peak_mb']:.0f} MB (+{r['above_mb']:.0f})"
    else:
        fmt = lambda r: f"{r[key]:.2f} {unit}"
    return dict(figure=figure, model=model_name, what=what, value=fmt(a), baseline=fmt(b), ratio=ratio,
                goal=goal, met=check(round(ratio, 2)) if check else None)


# ------------------------------------------------------------------------ the environment (--env)


def env_bench(root, slots, rounds):
    """Print what the environment costs: the pool's start, then `rounds` times a reset, a step (one
    API call) and a score of `slots` episodes at once."""
    train_ids = appworld_env.load_task_ids("train", root)
    tasks, ids = [train_ids[i % len(train_ids)] for i in range(slots)], list(range(slots))
    cell = '```python\nprint(apis.supervisor.show_profile()["first_name"])\n```'
    start, times = time.perf_counter(), {"reset": [], "step": [], "score": []}
    with appworld_env.EnvPool(slots, root) as pool:
        print(f"pool start (the zygote imports AppWorld, opens a world): {time.perf_counter() - start:.2f} s")
        for _ in range(rounds):
            for op, call in (("reset", lambda: pool.reset(ids, tasks)), ("step", lambda: pool.step(ids, [cell] * slots)),
                             ("score", lambda: pool.score(ids))):
                start = time.perf_counter()
                call()
                times[op].append(time.perf_counter() - start)
    for op, seconds in times.items():
        print(f"{op} of {slots} episodes at once, s per round: {' '.join(f'{s:.2f}' for s in seconds)}")


# ------------------------------------------------------------------------- GPU figures (--gpu)

# Shapes of Qwen2.5-7B-Instruct and Qwen2.5-32B-Instruct, from their config.json files (no hub here):
# models of these sizes with random weights cost what the real ones cost.
QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                 rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)
QWEN25_32B = dict(QWEN25_7B, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                  num_attention_heads=40, num_key_value_heads=8)
# What torch sees of each card in the GPU check machines (nvidia-smi's MiB), for the computed rows.
CARDS = {"H100 80GB": 81559 * 2**20, "H200 141GB": 143771 * 2**20}


@dataclasses.dataclass
class GpuSizes:
    episodes: int = 32  # G1: episodes sampled together
    k: int = 8  # G1: rollouts per task
    turns: int = 2  # G1: turns per episode
    new_tokens: int = 128  # G1: tokens per turn
    lengths: tuple = (8192, 16384, 32768)  # G2: tokens per micro-batch
    context: int = 8192  # G3: tokens each live episode holds


def random_model(shape, tokenizer, device, dtype=torch.bfloat16):
    """A Qwen2 causal LM of `shape` with random weights, made directly on `device` in `dtype` (HF's own
    init runs there: no CPU copy, nothing downloaded), with LoRA and gradient checkpointing as train.py
    sets them up. Pads with the tokenizer's pad id, as model.load does."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**shape), dtype=dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    M.add_lora(model)
    M.enable_gradient_checkpointing(model)
    return model.eval()


def long_episode(vocab, T, seed=0):
    """A rollout.Episode of T random tokens: a prompt of T - 6 (T // 8), then three turns of T // 8 agent
    tokens, each followed by T // 8 observation tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(100, vocab, (n,), generator=g).tolist()
    e = rollout.Episode(task_id="long")
    e.append(ids(T - 6 * (T // 8)))
    for _ in range(3):
        e.append(ids(T // 8), agent=True, logprobs=[-1.0] * (T // 8))
        e.num_turns += 1
        e.append(ids(T // 8))
    return e


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _out_of_memory(e):
    """Whether a RuntimeError is the device running out of memory (torch's allocator raises
    OutOfMemoryError; a library allocating on its own may raise a plain RuntimeError)."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower() or "ALLOC_FAILED" in str(e)


def _or_oom(fn):
    """fn(), or {"error": "out of memory"} with the memory given back."""
    try:
        return fn()
    except RuntimeError as e:
        if not _out_of_memory(e):
            raise
    gc.collect()  # out of the except block: its traceback held the tensors
    torch.cuda.empty_cache()
    return {"error": "out of memory"}


def gpu_sampling(model, tokenizer, device, s: GpuSizes):
    """G1: new tokens/s of rollout.collect (all episodes in one batch, each keeping its KV cache
    between turns) / HF generate on the same conversations, batched, each turn re-reading the whole
    conversation (what a generate-based sampler does). The same LoRA model samples in both; each is
    warmed up once first."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    tasks = [f"task_{i}" for i in range(s.episodes // s.k)]

    def collect(turns, new_tokens):
        episodes = rollout.collect(model, tokenizer, InstantEnv(s.episodes, turns), tasks, s.k,
                                   max_new_tokens=new_tokens, progress=False)
        return sum(sum(e.agent_mask) for e in episodes)

    def generate(turns, new_tokens):
        env = InstantEnv(s.episodes, turns)
        convs = [rollout.prompt_ids(tokenizer, m) for m in env.reset(list(range(s.episodes)), [t for t in tasks for _ in range(s.k)])]
        total = 0
        for _ in range(turns):
            width = max(map(len, convs))
            ids = torch.tensor([[pad] * (width - len(c)) + c for c in convs], device=device)  # (B, W), left padded
            mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in convs], device=device)  # (B, W)
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, eos_token_id=eos, pad_token_id=pad)[:, width:].tolist()
            obs = rollout.observation_ids(tokenizer, "Execution successful.")
            for i, new in enumerate(out):
                new = new[:new.index(eos) + 1] if eos in new else new
                total += len(new)
                convs[i] = convs[i] + new + ([] if new[-1] == eos else [eos]) + obs
        return total

    out = {}
    with torch.no_grad():
        for name, fn in (("collect", collect), ("generate", generate)):
            fn(1, 4)  # warm-up: kernels, cuBLAS plans
            _sync(device)
            t0 = time.perf_counter()
            tokens = fn(s.turns, s.new_tokens)
            _sync(device)
            seconds = time.perf_counter() - t0
            out[name] = dict(new_tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds)
    return out


def gpu_update(model, tokenizer, device, s: GpuSizes):
    """G2: time and peak memory of one LOOP update (train.ppo_update: old log-probs, clipped loss,
    backward through the checkpointed layers, AdamW on the LoRA weights) on one episode of T tokens
    / one SFT step (sft_step: NLL of the same agent tokens through the same chunked log-probs) / the
    same SFT step through HF's full logits. Peak memory includes the weights."""
    model.train()  # HF checkpoints only in train mode
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    args = train.Args(epochs=1, minibatch=1, micro_batch=1)
    vocab = len(tokenizer)

    def loop(e):
        return lambda: train.ppo_update(model, opt, [e], [0.5], e, args, 1, device)

    def sft(e, head):
        batch = rollout.collate([e], tokenizer.pad_token_id).to(device)
        return lambda: sft_step(model, batch, opt, 1, head, agent_only=True)

    out = {}
    warm = long_episode(vocab, max(64, s.lengths[0] // 8))
    loop(warm)()
    sft(warm, "chunked")()
    for T in s.lengths:
        e = long_episode(vocab, T)
        out[T] = dict(agent_tokens=sum(e.agent_mask))
        for name, fn in (("loop", loop(e)), ("sft", sft(e, "chunked")), ("sft_full_logits", sft(e, "full"))):
            out[T][name] = _or_oom(lambda: measured(fn)[1])
            opt.zero_grad(set_to_none=True)  # what a step cut by an out-of-memory error left behind
    model.eval()
    return out


def gpu_fit(model, tokenizer, device, s: GpuSizes, free=None):
    """G3: the largest number N of live episodes of s.context tokens that rollout.collect can sample
    (a second turn of each: the per-episode KV states kept from the first turn, each prefilling its
    observation, then decoding together) next to the model's weights on this device, found by
    bisection on out-of-memory errors. The bisection stops at the bound the arithmetic gives for one
    copy of the KV cache: (free memory after the weights) / (KV bytes of one episode). `free`: those
    bytes (default: what the device has free now)."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_episode = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 2 * s.context  # K and V, bf16
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if free is None:
        gc.collect()
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info(device)[0]
    one_copy = free // per_episode
    total = torch.cuda.get_device_properties(device).total_memory if torch.device(device).type == "cuda" else weights + free
    opening = InstantEnv(1, 2).reset([0], ["t"])[0]
    fill = s.context - len(rollout.prompt_ids(tokenizer, opening)) - 8  # room for the first turn's tokens
    if fill < 0:
        raise ValueError(f"G3: a context of {s.context} tokens is shorter than the opening prompt (--gpu-context)")
    opening[-1] = {**opening[-1], "content": opening[-1]["content"] + " apple" * fill}

    class LongEnv(InstantEnv):
        def reset(self, slots, task_ids):
            super().reset(slots, task_ids)
            return [opening] * len(slots)

    peaks = {}

    def fits(n):
        reset_peak()
        try:
            episodes = rollout.collect(model, tokenizer, LongEnv(n, 2), ["t"], n, max_new_tokens=2,
                                       max_seq_len=s.context + 64, progress=False)
            if any(e.num_turns < 2 for e in episodes):
                raise RuntimeError(f"G3: episodes ended before their second turn: {[e.end_reason for e in episodes]}")
            peaks[n] = (peak_mb(), max(len(e.token_ids) for e in episodes))
            return True
        except RuntimeError as e:
            if not _out_of_memory(e):
                raise
        gc.collect()
        torch.cuda.empty_cache()
        return False

    lo, hi = 0, one_copy + 1  # N = lo fits; N = hi does not (past the one-copy bound)
    with torch.no_grad():
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    peak, tokens = peaks.get(lo, (None, None))
    return dict(largest_n=lo, one_copy_n=one_copy, per_episode_bytes=per_episode, weights_bytes=weights,
                total_bytes=total, free_bytes=free, peak_mb=peak, episode_tokens=tokens, tries=sorted(peaks))


def gpu_figures(device, sizes, path, shapes=(QWEN25_7B, QWEN25_32B), free=None):
    """G1 and G2 on a model of shapes[0], then G3 on one of shapes[1], each on `device` in bf16; the
    numbers go to `path` after every figure, so a run cut short keeps what it measured. A figure
    that fails (its model's making included) is recorded and the next one runs. Returns the rows."""
    device = torch.device(device)
    _, tokenizer = M.load(tiny=True, device="cpu")  # SmolLM2's tokenizer: its ids are valid for any vocabulary this large
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results, started = dict(sizes=dataclasses.asdict(sizes)), time.time()
    figures = [("G1", shapes[0], lambda m: gpu_sampling(m, tokenizer, device, sizes)),
               ("G2", shapes[0], lambda m: gpu_update(m, tokenizer, device, sizes)),
               ("G3", shapes[1], lambda m: gpu_fit(m, tokenizer, device, sizes, free))]
    model = built = None
    for figure, shape, fn in figures:
        t0 = time.time()
        try:
            if shape is not built:
                model = built = None  # the last model leaves the device before the next is made
                gc.collect()
                torch.cuda.empty_cache()
                model, built = random_model(shape, tokenizer, device), shape
            results[figure] = fn(model)
        except Exception:
            results[figure] = {"error": traceback.format_exc(limit=8)}
        print(f"[bench --gpu] {figure} done in {time.time() - t0:.0f} s", flush=True)
        rows = gpu_rows(results, gpu, sizes)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(dict(machine=machine(torch.get_num_threads()), gpu=gpu, seconds=time.time() - started,
                           rows=rows, raw=results, command=" ".join(["python"] + sys.argv)), f, indent=1, default=str)
    return rows


def gpu_rows(results, gpu, s):
    """The table rows of G1-G3 from their numbers (a figure that failed gives one 'error' row)."""
    rows = []

    def row(figure, what, value, baseline, ratio, goal="", met=None, model="Qwen2.5-7B shape"):
        rows.append(dict(figure=figure, model=model, what=what, value=value, baseline=baseline, ratio=ratio,
                         goal=goal, met=met, device=gpu))

    def failed(key, figure, model="Qwen2.5-7B shape"):
        r = results.get(key)
        if r is not None and "error" in r:
            rows.append(dict(figure=figure, model=model, what="error", value="error", baseline="", ratio=None,
                             goal="", met=None, device=gpu, error=r["error"][-1500:]))
        return r is None or "error" in r

    if not failed("G1", "G1 sampling"):
        c, g = results["G1"]["collect"], results["G1"]["generate"]
        row("G1 sampling", f"rollout.collect / HF generate, both batched, new tok/s ({s.episodes} episodes x {s.turns} "
            f"turns x <= {s.new_tokens} tok, bf16, LoRA)", f"{c['tokens_per_s']:.0f} tok/s",
            f"{g['tokens_per_s']:.0f} tok/s", c["tokens_per_s"] / g["tokens_per_s"])
    if not failed("G2", "G2 update"):
        for T, r in results["G2"].items():
            what = f"{T} tok per micro-batch, {r['agent_tokens']} agent"
            rows.append(_row("G2 update", "Qwen2.5-7B shape", f"LOOP update / SFT step, time ({what})",
                             r["loop"], r["sft"], "seconds", "", None, unit="s"))
            rows.append(_row("G2 update", "Qwen2.5-7B shape", f"LOOP update / SFT step, peak memory ({what})",
                             r["loop"], r["sft"], "peak_mb", "<= 1.00", lambda x: x <= 1.0, unit="MB"))
            rows.append(_row("G2 update", "Qwen2.5-7B shape", f"LOOP update / SFT step via HF full logits, peak memory ({what})",
                             r["loop"], r["sft_full_logits"], "peak_mb", "", None, unit="MB"))
            for x in rows[-3:]:
                x["device"] = gpu
    if not failed("G3", "G3 fit", "Qwen2.5-32B shape"):
        r = results["G3"]
        gib = lambda b: f"{b / 2**30:.1f} GiB"
        what = (f"live {s.context}-tok episodes that rollout.collect samples beside the weights ({gib(r['weights_bytes'])}); "
                f"{gib(r['per_episode_bytes'])} of KV each")
        row("G3 fit", f"{what}: measured / one KV copy by arithmetic (peak {r['peak_mb'] or 0:.0f} MB)",
            str(r["largest_n"]), str(r["one_copy_n"]), r["largest_n"] / max(r["one_copy_n"], 1), model="Qwen2.5-32B shape")
        overhead = r["total_bytes"] - r["weights_bytes"] - r["free_bytes"]  # CUDA context, allocator
        for card, total in CARDS.items():
            room = max(total - r["weights_bytes"] - overhead, 0)
            scaled = int(r["largest_n"] * room / max(r["free_bytes"], 1))
            row("G3 fit", f"{what} on an {card}, COMPUTED: scaled from the measured N / one KV copy by arithmetic",
                str(scaled), str(room // r["per_episode_bytes"]), None, model="Qwen2.5-32B shape")
    return rows


# ------------------------------------------------------------------------------------- main


def machine(threads):
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except (OSError, AttributeError):
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    device = torch.cuda.get_device_name() if CUDA else f"CPU {cpu}"
    return dict(device=device, cores=os.cpu_count(), ram_gib=round(ram, 1), torch=torch.__version__,
                threads=threads, python=platform.python_version(), load_average=os.getloadavg())


def print_table(rows):
    header = ("figure", "model", "what (value / baseline)", "value", "baseline", "ratio", "goal", "met")
    lines = [[r["figure"], r["model"], r["what"], r["value"], r["baseline"],
              "-" if r["ratio"] is None else f"{r['ratio']:.2f}", r["goal"],
              "" if r["met"] is None else ("yes" if r["met"] else "NO")] for r in rows]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for line in lines:
        print("| " + " | ".join(str(x) for x in line) + " |")
    for r in rows:
        if r.get("note"):
            print(f"\n{r['figure']} {r['model']}: {r['note']}")
        if r.get("error"):
            print(f"\n{r['figure']} {r['model']} {r['what']}: error\n{r['error']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a ~2 minute subset")
    parser.add_argument("--only", default="1,2,3,4,5,6,7,8,9", help="comma-separated figures to run (4 comes with 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in every process")
    parser.add_argument("--models", default=None, help="comma-separated subset of tiny,smol (default: tiny with --quick, else both)")
    parser.add_argument("--glibc-default", action="store_true", help="measure memory with glibc's default malloc settings")
    parser.add_argument("--json", default=None, help="where to write the numbers (default: runs/bench.json, with --gpu runs/bench_gpu.json)")
    parser.add_argument("--gpu", action="store_true", help="the GPU figures G1-G3 instead (needs a CUDA GPU)")
    g = GpuSizes()
    parser.add_argument("--gpu-episodes", type=int, default=g.episodes, help=f"G1: episodes sampled together (default {g.episodes})")
    parser.add_argument("--gpu-new-tokens", type=int, default=g.new_tokens, help=f"G1: tokens per turn (default {g.new_tokens})")
    parser.add_argument("--gpu-lengths", default=",".join(map(str, g.lengths)), help="G2: tokens per micro-batch, comma-separated")
    parser.add_argument("--gpu-context", type=int, default=g.context, help=f"G3: tokens each live episode holds (default {g.context})")
    parser.add_argument("--env", action="store_true", help="time the environment alone (EnvPool) instead")
    parser.add_argument("--slots", type=int, default=4, help="--env: episodes at once")
    parser.add_argument("--rounds", type=int, default=3, help="--env: rounds of reset, step and score")
    parser.add_argument("--root", default=appworld_env.DEFAULT_ROOT, help="--env: AppWorld root (its data is in ROOT/data)")
    args = parser.parse_args()
    if args.env:
        env_bench(args.root, args.slots, args.rounds)
        return
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("bench.py --gpu needs a GPU: torch sees no CUDA device here. The CPU figures run without --gpu.")
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # G3's bisection frees and refills the memory
        sizes = GpuSizes(episodes=args.gpu_episodes, new_tokens=args.gpu_new_tokens, context=args.gpu_context,
                         lengths=tuple(int(x) for x in args.gpu_lengths.split(",")))
        path = args.json or "runs/bench_gpu.json"
        print(f"bench --gpu on {torch.cuda.get_device_name()}, torch {torch.__version__}: {sizes}", flush=True)
        print_table(gpu_figures("cuda", sizes, path))
        print(f"\nnumbers written to {path}")
        return
    args.json = args.json or "runs/bench.json"
    only = set(args.only.split(","))
    q = args.quick
    models = args.models.split(",") if args.models else (["tiny"] if q else ["tiny", "smol"])
    info = machine(args.threads)
    env = {} if args.glibc_default else MEMORY_ENV
    print(f"machine: {info['device']}, {info['cores']} cores, {info['ram_gib']} GiB, torch {info['torch']}, "
          f"{args.threads} threads per process, float32, load average {info['load_average'][0]:.1f}"
          f"{'' if CUDA else f', peak RSS per fresh process, malloc env {env or None}'}", flush=True)
    rows, results, started = [], {}, time.time()
    timings = {}

    def run(figure, fn, *a):
        t0 = time.time()
        fn(*a, rows, results)
        timings[figure] = time.time() - t0
        print(f"[bench] figure {figure} done in {timings[figure]:.0f} s", flush=True)

    if only & {"1", "4"}:
        run("1+4", figure1_and_4, models, args.threads, env)
    if "2" in only:
        lengths = {"tiny": [4096] if q else [1024, 4096, 8192], "smol": [1024]}
        run("2", figure2, models, lengths, args.threads, env)
    settings = {"tiny": dict(episode_counts=[6, 24], k=6, max_new_tokens=160, turns=2, sequential_episodes=6),
                "smol": dict(episode_counts=[6, 24], k=6, max_new_tokens=64, turns=2, sequential_episodes=3)}
    if "3" in only:
        run("3", figure3, models, settings, args.threads)
    if "5" in only:
        run("5", figure5, [(m, lora) for m in models for lora in ((False,) if q else (False, True) if m == "tiny" else (True,))],
            args.threads)
    if "6" in only:
        # train.py's offline defaults (SmolLM2, mini-world, K=6, short prompt, 2 epochs, micro-batch 6), scaled down
        flags = ["--tasks-per-iter", "1", "--env-workers", "3", "--max-interactions", "2", "--max-new-tokens", "48",
                 "--minibatch", "6"] if q else \
                ["--tasks-per-iter", "1", "--env-workers", "6", "--max-interactions", "2", "--max-new-tokens", "64",
                 "--minibatch", "6"]
        run("6", figure6, "smol" if "smol" in models else "tiny", flags, args.threads)
    if "7" in only:
        run("7", figure7, models, args.threads)
    if "8" in only:
        run("8", figure8, models, settings, args.threads)
    if "9" in only:
        run("9", figure9, models, args.threads)

    total = time.time() - started
    info["load_average_end"] = os.getloadavg()  # other work on the CPU slows the measurements down
    print(f"\nbench {'--quick ' if q else ''}finished in {total:.0f} s, load average now {info['load_average_end'][0]:.1f} ({', '.join(f'{k}: {v:.0f} s' for k, v in timings.items())})\n")
    print_table(rows)
    out = dict(machine=info, malloc_env=env, quick=q, seconds=total, figure_seconds=timings, rows=rows, raw=results,
               command=" ".join(["python"] + sys.argv))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1, default=str)
    print(f"\nnumbers written to {args.json}")


if __name__ == "__main__":
    main()
