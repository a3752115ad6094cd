"""K multi-turn rollouts per task, all live episodes batched, with exact token bookkeeping.

    episodes = collect(model, tokenizer, envs, task_ids, k=6)    # task-major: task 0 x k, task 1 x k, ...
    batch = collate(episodes, tokenizer.pad_token_id)            # padded tensors, aligned with token_logprobs

Token-in / token-out: `token_ids` are never re-tokenised. The chat template renders the opening messages
once; each turn appends exactly the ids the model sampled (the agent tokens), each observation the template's
tokens for a user message and the next assistant header. Our own sampling loop rather than HF `generate` gives
each token's log-prob at the sampling temperature, each episode its own token budget, and explicit cross-rank
synchronisation. Sampling draws from torch's global RNG: seed each rank differently.
"""
import contextlib
from collections import deque
from dataclasses import dataclass, field

import torch
from tqdm import tqdm
from transformers import DynamicCache

from model import any_rank, gathered, is_rank0, max_over_ranks


@dataclass
class Episode:
    """One rollout. The per-token lists all have len(token_ids)."""

    task_id: str
    token_ids: list = field(default_factory=list)  # the whole conversation, prompt included
    agent_mask: list = field(default_factory=list)  # True exactly on ids the model sampled
    turn_ids: list = field(default_factory=list)  # agent turn index (0, 1, ...) per token, -1 elsewhere
    sampler_logprobs: list = field(default_factory=list)  # sampler's log-prob per token, 0.0 at non-agent positions
    reward: float = 0.0
    success: bool = False
    pass_count: int = 0
    num_tests: int = 0
    num_turns: int = 0
    end_reason: str = ""  # "completed", "turn_limit", "context_limit" or "env_failed"
    info: dict = field(default_factory=dict)  # the environment's last info

    def append(self, ids, *, agent=False, logprobs=None):
        self.token_ids += ids
        self.agent_mask += [agent] * len(ids)
        self.turn_ids += [self.num_turns if agent else -1] * len(ids)
        self.sampler_logprobs += list(logprobs) if agent else [0.0] * len(ids)

    def record(self, result):
        """The outcome in an environment's StepResult."""
        self.reward, self.success = float(result.reward), bool(result.success)
        self.pass_count, self.num_tests = result.pass_count, result.num_tests
        self.info = dict(result.info or {})


@dataclass
class Batch:
    """Right-padded training tensors. The per-position fields are aligned with token_logprobs:
    position t is about token t+1 (its mask, turn, sampler log-prob)."""

    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long
    agent_mask: torch.Tensor  # (B, T-1) bool
    turn_ids: torch.Tensor  # (B, T-1) long, -1 off agent tokens
    sampler_logprobs: torch.Tensor  # (B, T-1) float32
    rewards: torch.Tensor  # (B,) float32

    def to(self, device):
        return Batch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def select(self, rows):
        """The given rows (a micro-batch), with the columns that are padding in all of them cut."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        T = int(self.attention_mask[rows].sum(-1).max())
        return Batch(self.input_ids[rows, :T], self.attention_mask[rows, :T], self.agent_mask[rows, : T - 1],
                     self.turn_ids[rows, : T - 1], self.sampler_logprobs[rows, : T - 1], self.rewards[rows])


def collate(episodes, pad_id):
    """Pad episodes on the right into a Batch (right padding: positions are then 0..len-1)."""
    if not episodes:
        raise ValueError("collate: no episodes")

    def pad(field, value, dtype):  # (B, T): one row per episode, `value` after its end
        rows = [torch.tensor(field(e), dtype=dtype) for e in episodes]
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value)

    return Batch(input_ids=pad(lambda e: e.token_ids, pad_id, torch.long),
                 attention_mask=pad(lambda e: [1] * len(e.token_ids), 0, torch.long),
                 agent_mask=pad(lambda e: e.agent_mask, False, torch.bool)[:, 1:],  # (B, T-1): shifted
                 turn_ids=pad(lambda e: e.turn_ids, -1, torch.long)[:, 1:],
                 sampler_logprobs=pad(lambda e: e.sampler_logprobs, 0.0, torch.float32)[:, 1:],
                 rewards=torch.tensor([e.reward for e in episodes], dtype=torch.float32))  # (B,)


def prompt_ids(tokenizer, messages):
    """The opening messages rendered once by the chat template, ending in the assistant header."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def observation_ids(tokenizer, text):
    """The template's tokens after the model's end-of-turn token up to its next turn (footer, user
    message `text`, assistant header): the difference of two renderings, tokenised after an
    end-of-turn token so the boundary splits as in a full rendering."""
    eos = tokenizer.eos_token
    base = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    before = tokenizer.apply_chat_template(base, tokenize=False)
    after = tokenizer.apply_chat_template(base + [{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=False)
    if not after.startswith(before) or eos not in before:
        raise ValueError("observation_ids: this chat template does not render turns as appendable text")
    footer = before[before.rindex(eos) + len(eos) :]  # e.g. "\n" after <|im_end|>
    ids = tokenizer.encode(eos + footer + after[len(before) :], add_special_tokens=False)
    assert ids[0] == tokenizer.eos_token_id, "the end-of-turn token must encode as one id"
    return ids[1:]


def stop_ids(tokenizer, model) -> set[int]:
    """The ids that end an agent turn: the tokenizer's eos, the generation config's eos_token_id (int or
    list), and the template's turn-start marker (a model inventing the user's reply stops there)."""
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = {tokenizer.eos_token_id, *(declared if isinstance(declared, (list, tuple)) else [declared])}
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    ids |= {next((i for i in observation_ids(tokenizer, "x") if i in special), None)}
    return ids - {None}


def _batch_cache(model, states, width):
    """Stack per-row key/value states into one left-padded HF cache of `width` positions, emptying
    `states` layer by layer so each row's copy is freed once the batch's is built."""
    cache = DynamicCache(config=model.config)
    for layer in range(len(states[0])):
        ks, vs = [], []
        for s in states:
            (k, v), s[layer] = s[layer], None  # (heads, n, head_dim) each
            pad = k.new_zeros(k.shape[0], width - k.shape[1], k.shape[2])  # (heads, width - n, head_dim)
            ks.append(torch.cat([pad, k], dim=1))
            vs.append(torch.cat([pad, v], dim=1))
        cache.update(torch.stack(ks), torch.stack(vs), layer)  # (B, heads, width, head_dim) each
    return cache


def _prefill(model, prompts, caches, cached, pad_id):
    """Each row's key/value states over its prompt and its next-token logits. One forward per row over what
    its cache does not cover (its first `cached` tokens), shared by rows with the same uncached prompt (a
    task's K first turns); every rank runs as many as the busiest (a sharded forward is a collective)."""
    device = next(model.parameters()).device
    passes = {}  # key -> the rows it serves
    for i, (p, c) in enumerate(zip(prompts, caches)):
        passes.setdefault(("shared", tuple(p)) if c is None else ("row", i), []).append(i)
    n_passes = max_over_ranks(len(passes))
    states, logits = [None] * len(prompts), [None] * len(prompts)
    for rows in passes.values():
        p, n = prompts[rows[0]], cached[rows[0]]
        cache = _batch_cache(model, [caches[rows[0]]], n) if n else None
        caches[rows[0]] = None  # the old states live on in `cache` only, extended by the pass
        out = model(input_ids=torch.tensor([p[n:]], device=device),  # (1, L): the row's new tokens
                    position_ids=torch.arange(n, len(p), device=device)[None],  # (1, L)
                    cache=cache, use_cache=True, logits_to_keep=1)
        for r in rows:
            states[r] = [(layer.keys[0], layer.values[0]) for layer in out.cache.layers]  # (heads, len(p), head_dim) x2
            logits[r] = out.logits[0, -1]  # (V,)
    for _ in range(n_passes - len(passes)):  # fewer passes than another rank: take part in its collectives
        model(input_ids=torch.full((1, 1), pad_id, device=device), use_cache=True, logits_to_keep=1)
    return states, torch.stack(logits).float()  # B rows of layers; (B, V)


def _draw(logits, temperature, greedy):
    """The next token of each row and its log-prob under the sampling distribution (T = 1 if greedy)."""
    logprobs = torch.log_softmax(logits / (1.0 if greedy else temperature), dim=-1)  # (B, V)
    if greedy:
        next_ids = logprobs.argmax(-1)  # (B,)
    else:  # inverse-CDF draw: exact, and cheaper than torch.multinomial over a large vocabulary
        cdf = logprobs.exp().cumsum(-1)  # (B, V)
        u = torch.rand(len(cdf), 1, device=cdf.device) * cdf[:, -1:]  # (B, 1)
        next_ids = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_max(cdf.shape[-1] - 1)  # (B,)
    return next_ids, logprobs.gather(-1, next_ids[:, None]).squeeze(-1)  # (B,), (B,)


@torch.no_grad()
def sample(model, prompts, budgets, *, stop, pad_id, temperature=1.0, greedy=False, caches=None):
    """Continue every prompt by at most its budget of tokens; a row stops at any id in `stop`. Returns per
    row the sampled ids, their log-probs at the sampling temperature (1 for greedy), and the key/value
    states of the prompt and all sampled ids but the last (never fed).

    `caches`: per row None, or states from an earlier call covering a prefix of the prompt; emptied as
    used, so no row's states exist twice. All rows decode in one left-padded batch whose mask and positions
    give each row what it would get alone; a rank whose rows are done steps on until every rank's are.
    """
    device = next(model.parameters()).device
    B = len(prompts)
    caches = caches or [None] * B
    cached = [0 if c is None else c[0][0].shape[1] for c in caches]  # positions each cache covers
    if any(n >= len(p) for n, p in zip(cached, prompts)):
        raise ValueError("sample: each cache must leave at least one prompt token to feed")
    states, logits = _prefill(model, prompts, caches, cached, pad_id)  # B rows of layers; (B, V)

    W = max(len(p) for p in prompts)
    cache = _batch_cache(model, states, W)  # [padding, row] layout; empties `states`
    attention_mask = torch.tensor([[0] * (W - len(p)) + [1] * len(p) for p in prompts], device=device)  # (B, W)
    position_ids = torch.tensor([[len(p)] for p in prompts], device=device)  # (B, 1): next position per row
    out_ids, out_logprobs = [[] for _ in range(B)], [[] for _ in range(B)]
    done = [b <= 0 for b in budgets]
    while True:
        next_ids, chosen = _draw(logits, temperature, greedy)  # (B,), (B,)
        for i, (t, lp) in enumerate(zip(next_ids.tolist(), chosen.tolist())):
            if not done[i]:
                out_ids[i].append(t)
                out_logprobs[i].append(lp)
                done[i] = t in stop or len(out_ids[i]) >= budgets[i]
        if not any_rank(not all(done)):  # every rank's rows are done
            break
        fed = torch.tensor([not d for d in done], device=device)  # (B,): rows still generating
        attention_mask = torch.cat([attention_mask, fed.long()[:, None]], dim=1)  # (B, W+s)
        out = model(input_ids=torch.where(fed, next_ids, pad_id)[:, None], attention_mask=attention_mask,
                    position_ids=position_ids, cache=cache, use_cache=True, logits_to_keep=1)
        cache = out.cache
        logits = out.logits[:, -1].float()  # (B, V)
        position_ids = position_ids + 1  # (B, 1)
    keep = attention_mask.bool()  # (B, W+s): each row's real positions
    new_caches = [[] for _ in range(B)]
    while cache.layers:  # one layer at a time, so each is freed once cut up
        layer = cache.layers.pop(0)
        for i in range(B):
            new_caches[i].append((layer.keys[i][:, keep[i]], layer.values[i][:, keep[i]]))  # (heads, n, head_dim) x2
    return out_ids, out_logprobs, new_caches


def collect(model, tokenizer, envs, task_ids, k, *, temperature=1.0, greedy=False, max_new_tokens=1500,
            max_seq_len=32768, max_turns=None, score_cut=True, gather_weights=True, reuse_cache=True, progress=True):
    """Run K episodes of each task and return them task-major (task 0 x k, task 1 x k, ...).

    `envs` (appworld_env.EnvPool) has len(envs) slots and batched `reset(slots, task_ids)`, `step(slots,
    texts)` and `score(slots)`; a pending episode starts as soon as a slot frees. Each round samples the
    next turn of every live episode in one batch, then steps their environments. An episode whose turn or
    next observation would not fit `max_seq_len` ends with "context_limit", scored as it stands if
    `score_cut` (else reward 0); `max_turns` (None: the environment's limit) ends one with "turn_limit".
    `gather_weights`: hold a sharded model's full weights for the phase (off when one copy does not fit).
    `reuse_cache`: keep key/value states between turns (2 x layers x kv_heads x head_dim numbers a token).
    """
    if k < 1 or len(envs) < 1:
        raise ValueError(f"collect: need k >= 1 and at least one env slot (k={k}, slots={len(envs)})")
    episodes = [Episode(task_id=t) for t in task_ids for _ in range(k)]
    pending = deque(episodes)  # not started yet
    free = list(range(len(envs)))  # slots without a live episode, in the order they freed
    live, kv = {}, {}  # slot -> its Episode; slot -> that episode's key/value states after its last turn
    sampling = dict(stop=stop_ids(tokenizer, model), pad_id=tokenizer.pad_token_id, temperature=temperature,
                    greedy=greedy)
    bar = tqdm(total=len(episodes), desc="rollouts", disable=not (progress and is_rank0()), dynamic_ncols=True)
    rewards = []  # of the finished episodes, for the bar

    def finish(ended, cut=()):
        """End the episodes of `ended` ({slot: reason}) and of `cut` (slots at the context limit)."""
        if cut and score_cut:
            for slot, r in zip(cut, envs.score(cut)):
                live[slot].record(r)
        cut = {s: "env_failed" if live[s].info.get("env_failed") else "context_limit" for s in cut}
        for slot, reason in {**ended, **cut}.items():
            e = live.pop(slot)
            e.end_reason = reason
            kv.pop(slot, None)
            free.append(slot)
            rewards.append(e.reward)
            bar.update(1)
            bar.set_postfix(reward=f"{sum(rewards) / len(rewards):.3f}", refresh=False)

    with gathered(model) if gather_weights else contextlib.nullcontext():
        while True:
            if pending and free:  # fill the free slots with one batched reset before generating
                slots = [free.pop(0) for _ in range(min(len(free), len(pending)))]
                starting = [pending.popleft() for _ in slots]
                for slot, e, messages in zip(slots, starting, envs.reset(slots, [e.task_id for e in starting])):
                    live[slot] = e
                    e.append(prompt_ids(tokenizer, messages))
                finish({}, [s for s in slots if len(live[s].token_ids) >= max_seq_len])
                continue
            if not any_rank(bool(live)):  # every rank is done
                break
            if not live:  # nothing here, but other ranks are sampling: take part in their collectives
                sample(model, [[tokenizer.eos_token_id]], [1], **sampling)
                continue
            texts, cut = _turn(model, tokenizer, live, kv if reuse_cache else {}, max_new_tokens, max_seq_len,
                               **sampling)
            ended, no_room = _step(tokenizer, envs, live, texts, max_turns, max_seq_len)
            finish(ended, cut + no_room)
    bar.close()
    return episodes


def _turn(model, tokenizer, live, kv, max_new_tokens, max_seq_len, *, stop, **sampling):
    """Sample and append the next turn of every live episode, from and into `kv` (its key/value states).
    Returns {slot: text} for the environments, and the slots whose turn the context cut (never run)."""
    slots = sorted(live)
    eos_id = tokenizer.eos_token_id
    budgets = [min(max_new_tokens, max_seq_len - len(live[s].token_ids)) for s in slots]
    new_ids, new_logprobs, caches = sample(model, [live[s].token_ids for s in slots], budgets, stop=stop,
                                           caches=[kv.pop(s, None) for s in slots], **sampling)
    kv.update(zip(slots, caches))
    texts, cut = {}, []
    for slot, ids, lps, budget in zip(slots, new_ids, new_logprobs, budgets):
        e = live[slot]
        e.append(ids, agent=True, logprobs=lps)
        e.num_turns += 1
        if ids[-1] != eos_id:
            if len(e.token_ids) + 1 > max_seq_len or (ids[-1] not in stop and budget < max_new_tokens):
                cut.append(slot)  # by the context, not by max_new_tokens
                continue
            e.append([eos_id])  # close the turn as the template does; not sampled, not an agent token
        texts[slot] = tokenizer.decode(ids, skip_special_tokens=True)
    return texts, cut


def _step(tokenizer, envs, live, texts, max_turns, max_seq_len):
    """Run each slot's text in its environment and append the observation. Returns {slot: end reason} of
    the episodes that ended, and the slots with no room left for their next observation."""
    ended, no_room = {}, []
    for slot, r in zip(texts, envs.step(list(texts), list(texts.values())) if texts else []):
        e = live[slot]
        e.record(r)
        if e.info.get("env_failed"):
            ended[slot] = "env_failed"
        elif r.done:  # EnvPool evaluates at its interaction limit too: info["completed"] says who ended it
            ended[slot] = "turn_limit" if e.info.get("completed") is False else "completed"
        elif max_turns is not None and e.num_turns >= max_turns:
            ended[slot] = "turn_limit"
        else:
            obs = observation_ids(tokenizer, r.observation)
            if len(e.token_ids) + len(obs) + 1 > max_seq_len:  # no room for it and one sampled token
                no_room.append(slot)
            else:
                e.append(obs)
    return ended, no_room
