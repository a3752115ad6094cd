"""K multi-turn rollouts per task, all live episodes batched, with exact token bookkeeping.

    episodes = collect(model, tokenizer, envs, task_ids, k=6)    # task-major: task 0 x k, task 1 x k, ...
    batch = collate(episodes, tokenizer.pad_token_id)            # padded tensors, aligned with token_logprobs

Token-in / token-out: an episode's `token_ids` are built incrementally and are never
re-tokenised. The chat template renders the opening messages once (with the assistant header); each
turn appends exactly the ids the model sampled, up to and including the id that ended it (these and
only these are agent tokens); each observation appends the template's tokens for a user message and
the next assistant header. The text the environment sees is decoded from the sampled ids; the
training sequence is the ids themselves.

Choices worth knowing:
- We sample with our own short loop over the model's forward (KV cache, left padding) rather than
  HF `generate`: it gives each sampled token's log-prob at the sampling temperature without keeping
  (steps, B, V) logits around, lets every episode have its own token budget, and makes the
  cross-rank synchronisation explicit (see `sample`).
- A turn ends at any of `stop_ids`: the end-of-turn ids the model declares and the chat template's
  turn-start marker (a model opening a turn of its own, e.g. inventing the user's reply, is stopped
  there, so that text never reaches the environment). A turn that ended otherwise (another stop id,
  or `max_new_tokens`) gets the template's end-of-turn token appended as a NON-agent token (the
  model did not sample it); a turn cut by `max_new_tokens` still goes to the environment.
- Context limit: an episode ends with "context_limit" when its next observation plus at least one
  new token would not fit `max_seq_len`, or when a turn is cut by that budget (rather than by
  `max_new_tokens`). The cut turn stays in the sequence (its tokens were sampled) but the
  environment never runs it. The episode is then scored as it stands (`envs.score`: the task's unit
  tests, the official code's partial credit); with `score_cut=False` it is not evaluated and keeps
  reward 0.
- Greedy decoding records log-probs at temperature 1. Sampling draws from torch's global RNG:
  seed each rank differently.
- Under FSDP the sampling phase gathers the weights once (`model.gathered`), instead of one
  all-gather per layer per decode step.
- Each live episode keeps its key/value states between turns (`reuse_cache`), so a turn prefills
  only what was appended since the last one instead of the whole conversation.

Simplification: a batch runs until its longest turn ends (no continuous batching within a turn).
"""
import contextlib
from collections import deque
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from model import any_rank, distributed, gathered, is_rank0, max_over_ranks

END_REASONS = ("completed", "turn_limit", "context_limit", "env_failed")


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
    end_reason: str = ""  # one of END_REASONS
    info: dict = field(default_factory=dict)  # the environment's last info

    def append(self, ids, *, agent=False, logprobs=None):
        self.token_ids += ids
        self.agent_mask += [agent] * len(ids)
        self.turn_ids += [self.num_turns if agent else -1] * len(ids)
        self.sampler_logprobs += list(logprobs) if agent else [0.0] * len(ids)


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
    B, T = len(episodes), max(len(e.token_ids) for e in episodes)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros(B, T, dtype=torch.long)  # (B, T)
    agent_mask = torch.zeros(B, T, dtype=torch.bool)  # (B, T), shifted below
    turn_ids = torch.full((B, T), -1, dtype=torch.long)  # (B, T)
    logprobs = torch.zeros(B, T, dtype=torch.float32)  # (B, T)
    for i, e in enumerate(episodes):
        n = len(e.token_ids)
        input_ids[i, :n] = torch.tensor(e.token_ids)
        attention_mask[i, :n] = 1
        agent_mask[i, :n] = torch.tensor(e.agent_mask)
        turn_ids[i, :n] = torch.tensor(e.turn_ids)
        logprobs[i, :n] = torch.tensor(e.sampler_logprobs)
    rewards = torch.tensor([e.reward for e in episodes], dtype=torch.float32)  # (B,)
    return Batch(input_ids, attention_mask, agent_mask[:, 1:], turn_ids[:, 1:], logprobs[:, 1:], rewards)


# ------------------------------------------------------------------------------ chat template


def prompt_ids(tokenizer, messages):
    """The opening messages rendered once by the chat template, ending in the assistant header."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def observation_ids(tokenizer, text):
    """The template's tokens between the model's end-of-turn token and its next turn: the rest of
    the assistant footer, a user message holding `text`, and the assistant header. Found by
    rendering a conversation with and without that user message (template text, not model text),
    and tokenised after an end-of-turn token so the boundary splits as in a full rendering."""
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
    """The ids that end an agent turn: every end-of-turn id the model declares (its generation
    config's eos_token_id, an int or a list), the tokenizer's, and the chat template's turn-start
    marker (the first special token of the template's text between two turns, e.g. <|im_start|>)."""
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = {tokenizer.eos_token_id, *(declared if isinstance(declared, (list, tuple)) else [declared])}
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    ids |= {next((i for i in observation_ids(tokenizer, "x") if i in special), None)}
    return ids - {None}


# ----------------------------------------------------------------------------------- sampling


def _batch_cache(model, states, width):
    """Stack per-row key/value states (per row, per layer: (heads, n, head_dim) twice) into one
    left-padded HF cache of `width` positions. Empties `states` layer by layer as it goes, so that
    each row's copy of a layer is freed as soon as the batch's is built."""
    from transformers import DynamicCache

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


def _prefill(model, prompts, caches, pad_id):
    """Each row's key/value states over its whole prompt and its next-token logits, one forward pass
    per row over what its cache does not cover (a row appending a short observation never pays for a
    neighbour's long prompt in padding). Rows with the same uncached prompt (the K rollouts of a task
    at their first turn) share one pass. Under torch.distributed every rank runs as many passes as
    the busiest one (one-token dummies), since a sharded model's forward is a collective."""
    device = next(model.parameters()).device
    passes = {}  # key -> the rows it serves
    for i, (p, c) in enumerate(zip(prompts, caches)):
        passes.setdefault(("shared", tuple(p)) if c is None else ("row", i), []).append(i)
    states, logits = [None] * len(prompts), [None] * len(prompts)
    for rows in list(passes.values()) + [None] * (max_over_ranks(len(passes)) - len(passes)):
        if rows is None:  # this rank has fewer passes than another: take part in its collectives
            model(input_ids=torch.full((1, 1), pad_id, device=device), use_cache=True, logits_to_keep=1)
            continue
        p, n = prompts[rows[0]], _cached_length(caches[rows[0]])
        cache = _batch_cache(model, [caches[rows[0]]], n) if n else None
        caches[rows[0]] = None  # the old states live on in `cache` only, extended by the pass
        out = model(input_ids=torch.tensor([p[n:]], device=device),  # (1, L): the row's new tokens
                    position_ids=torch.arange(n, len(p), device=device)[None],  # (1, L)
                    cache=cache, use_cache=True, logits_to_keep=1)
        for r in rows:
            states[r] = [(layer.keys[0], layer.values[0]) for layer in out.cache.layers]  # (heads, len(p), head_dim) x2
            logits[r] = out.logits[0, -1]  # (V,)
    return states, torch.stack(logits).float()  # B rows of layers; (B, V)


def _cached_length(states):
    return 0 if states is None else states[0][0].shape[1]


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
    """Continue every prompt by at most its budget of tokens; a row stops at any id in `stop`.
    Returns, per row, the sampled ids, their log-probs under the sampling distribution (temperature
    T; T = 1 for greedy), and the row's key/value states for its prompt and sampled ids but the last
    (which was never fed).

    `caches` (per row: None, or such states from an earlier call, covering a prefix of the prompt)
    lets a multi-turn episode prefill only what was appended since its last turn; the list is
    emptied as its states are used, so that no two copies of a row's states outlive its prefill.

    Prefill runs row by row (`_prefill`); decoding steps all rows together, one token each, in one
    left-padded batch: the attention mask hides the padding and positions count real tokens only,
    so every row gets the numbers it would get alone. Under torch.distributed a rank whose rows are
    all done keeps stepping its batch (outputs discarded) until every rank is done: each forward
    of a sharded model is a collective. The model is called on the same device as its weights.
    """
    device = next(model.parameters()).device
    B = len(prompts)
    caches = caches if caches is not None else [None] * B
    if any(_cached_length(c) >= len(p) for c, p in zip(caches, prompts)):
        raise ValueError("sample: each cache must leave at least one prompt token to feed")
    states, logits = _prefill(model, prompts, caches, pad_id)  # B rows of layers; (B, V)

    W = max(len(p) for p in prompts)
    cache = _batch_cache(model, states, W)  # [padding, row] layout
    del states
    attention_mask = torch.zeros(B, W, dtype=torch.long, device=device)  # (B, W), left padded
    for i, p in enumerate(prompts):
        attention_mask[i, W - len(p):] = 1
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
        step_ids = torch.where(fed, next_ids, pad_id)[:, None]  # (B, 1)
        attention_mask = torch.cat([attention_mask, fed.long()[:, None]], dim=1)  # (B, W+s)
        out = model(input_ids=step_ids, attention_mask=attention_mask, position_ids=position_ids,
                    cache=cache, use_cache=True, logits_to_keep=1)
        cache = out.cache
        logits = out.logits[:, -1].float()  # (B, V)
        position_ids = position_ids + 1  # (B, 1)
    # Each row's states at its real positions (what its next turn starts from), layer by layer,
    # taking each layer out of the batch's cache so that it is freed once it is cut up.
    keep = attention_mask.bool()  # (B, W+s)
    new_caches = [[] for _ in range(B)]
    while cache.layers:
        layer = cache.layers.pop(0)
        for i in range(B):
            new_caches[i].append((layer.keys[i][:, keep[i]], layer.values[i][:, keep[i]]))  # (heads, n, head_dim) x2
    return out_ids, out_logprobs, new_caches


# ------------------------------------------------------------------------------------ episodes


def collect(model, tokenizer, envs, task_ids, k, *, temperature=1.0, greedy=False, max_new_tokens=1500,
            max_seq_len=32768, max_turns=None, score_cut=True, gather_weights=True, reuse_cache=True, progress=True):
    """Run K episodes of each task and return them task-major (task 0 x k, task 1 x k, ...).

    `envs` has len(envs) worker slots, `reset(slots, task_ids) -> opening messages per slot`,
    `step(slots, texts) -> StepResult per slot` and `score(slots) -> StepResult per slot`
    (appworld_env.EnvPool). At most len(envs) episodes are live at once; a pending episode starts as
    soon as a slot frees. Each round generates the next turn of every live episode in one batch,
    then steps all their environments together.
    `max_turns` (None: leave it to the environment) ends an episode with "turn_limit".
    `score_cut`: score an episode cut by `max_seq_len` as it stands (one batched `envs.score` call
    per round); off, its reward stays 0.
    `gather_weights`: a sharded model keeps its full weights during the phase (model.gathered);
    turn it off when one full copy does not fit on a device (then every step all-gathers).
    `reuse_cache`: keep each live episode's key/value states between its turns, so a turn prefills
    only the observation and header appended since the last one (memory per token: 2 x layers x
    kv_heads x head_dim numbers); off, each turn prefills it all.
    Under torch.distributed each rank collects its own tasks; ranks may hold different numbers of
    episodes and finish at different times (a rank with nothing live samples a dummy batch).
    """
    if k < 1 or len(envs) < 1:
        raise ValueError(f"collect: need k >= 1 and at least one env slot (k={k}, slots={len(envs)})")
    episodes = [Episode(task_id=t) for t in task_ids for _ in range(k)]
    pending = deque(episodes)  # not started yet
    free = list(range(len(envs)))  # slots without a live episode, in the order they freed
    live, kv = {}, {}  # slot -> its Episode; slot -> that episode's key/value states after its last turn
    stop = stop_ids(tokenizer, model)
    sampling = dict(stop=stop, pad_id=tokenizer.pad_token_id, temperature=temperature, greedy=greedy)
    bar = tqdm(total=len(episodes), desc="rollouts", disable=not (progress and is_rank0()), dynamic_ncols=True)

    def finish(reasons):  # {slot: end reason} of episodes that are over
        for slot, reason in reasons.items():
            e = live.pop(slot)
            e.end_reason = reason
            kv.pop(slot, None)
            free.append(slot)
            bar.update(1)
            done = [x.reward for x in episodes if x.end_reason]
            bar.set_postfix(reward=f"{sum(done) / len(done):.3f}", refresh=False)

    with gathered(model) if gather_weights else contextlib.nullcontext():
        while True:
            if pending and free:  # fill the free slots before generating
                started = _start(tokenizer, envs, pending, free, live)
                finish(_cut(envs, live, [s for s in started if len(live[s].token_ids) >= max_seq_len], score_cut))
                continue
            if not any_rank(bool(live)):  # every rank is done
                break
            if not live:  # nothing here, but other ranks are sampling: take part in their collectives
                sample(model, [[tokenizer.eos_token_id]], [1], **sampling)
                continue
            slots = sorted(live)
            texts, caches = _turn(model, tokenizer, [live[s] for s in slots], [kv.pop(s, None) for s in slots],
                                  max_new_tokens, max_seq_len, **sampling)
            if reuse_cache:
                kv.update(zip(slots, caches))
            del caches
            stepping = [s for s, t in zip(slots, texts) if t is not None]
            ended, cut = _step(tokenizer, envs, live, stepping, [t for t in texts if t is not None], max_turns,
                               max_seq_len)
            finish(ended)
            finish(_cut(envs, live, [s for s, t in zip(slots, texts) if t is None] + cut, score_cut))
    bar.close()
    return episodes


def _start(tokenizer, envs, pending, free, live):
    """Start pending episodes in the free slots with one batched reset; returns their slots."""
    slots = [free.pop(0) for _ in range(min(len(free), len(pending)))]
    starting = [pending.popleft() for _ in slots]
    for slot, e, messages in zip(slots, starting, envs.reset(slots, [e.task_id for e in starting])):
        live[slot] = e
        e.append(prompt_ids(tokenizer, messages))
    return slots


def _turn(model, tokenizer, eps, caches, max_new_tokens, max_seq_len, *, stop, **sampling):
    """Sample the next turn of every episode in one batch and append it. Returns per episode the
    text for its environment (None: the turn was cut by the context and never runs), and its
    key/value states for the next turn."""
    eos_id = tokenizer.eos_token_id
    budgets = [min(max_new_tokens, max_seq_len - len(e.token_ids)) for e in eps]
    new_ids, new_logprobs, new_caches = sample(model, [e.token_ids for e in eps], budgets, stop=stop,
                                               caches=caches, **sampling)
    texts = []
    for e, ids, lps, budget in zip(eps, new_ids, new_logprobs, budgets):
        e.append(ids, agent=True, logprobs=lps)
        e.num_turns += 1
        if ids[-1] != eos_id:
            if len(e.token_ids) + 1 > max_seq_len or (ids[-1] not in stop and budget < max_new_tokens):
                texts.append(None)  # cut by the context, not by max_new_tokens: never run
                continue
            e.append([eos_id])  # close the turn as the template does; not sampled, not an agent token
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts, new_caches


def _step(tokenizer, envs, live, slots, texts, max_turns, max_seq_len):
    """Step the environments of `slots` together and append each observation. Returns the episodes
    that ended ({slot: reason}) and those whose next observation would not fit (cut)."""
    ended, cut = {}, []
    for slot, r in zip(slots, envs.step(slots, texts) if slots else []):
        e = live[slot]
        _record(e, r)
        if e.info.get("env_failed"):
            ended[slot] = "env_failed"
        elif r.done:  # EnvPool evaluates at its interaction limit too: info["completed"] says who ended it
            ended[slot] = "turn_limit" if e.info.get("completed") is False else "completed"
        elif max_turns is not None and e.num_turns >= max_turns:
            ended[slot] = "turn_limit"
        else:
            obs = observation_ids(tokenizer, r.observation)
            if len(e.token_ids) + len(obs) + 1 > max_seq_len:  # no room for the observation and a token
                cut.append(slot)
            else:
                e.append(obs)
    return ended, cut


def _cut(envs, live, slots, score_cut):
    """Episodes that reached the context limit: scored as they stand (one batched call), or left at
    reward 0. Returns {slot: end reason}."""
    if slots and score_cut:
        for slot, r in zip(slots, envs.score(slots)):
            _record(live[slot], r)
    return {s: "env_failed" if live[s].info.get("env_failed") else "context_limit" for s in slots}


def _record(e, r):
    """An environment's StepResult into the episode."""
    e.reward, e.success = float(r.reward), bool(r.success)
    e.pass_count, e.num_tests = r.pass_count, r.num_tests
    e.info = dict(r.info or {})
