"""One causal LM that both samples the rollouts and takes the gradient steps: the paper keeps
"exactly one copy of the LLM in memory". The collectives that keep the ranks in step live here too.

    model, tokenizer = load()                    # offline default: SmolLM2-135M-Instruct (bundled)
    model, tokenizer = load(tiny=True)           # tiny random Llama, same tokenizer (tests)
    add_lora(model)                              # hand-written LoRA; everything else frozen
    enable_gradient_checkpointing(model)         # non-reentrant, per decoder layer
    model = shard(model, mixed_precision=True)   # FSDP2 under torchrun (bf16 compute), a no-op otherwise
    with gathered(model): ...                    # sampling: gather the shards once, not per step
    logps = token_logprobs(model, ids, mask)     # (B, T-1), never the (B, T, V) logits
    save(model, tokenizer, "out/")               # LoRA merged: AutoModelForCausalLM.from_pretrained("out/")

Precision as in the official code: frozen weights in bfloat16 where it is fast, trainable weights and
Adam's state in float32 (bfloat16 drops updates under ~1/256 of a weight), compute in bfloat16,
log-softmax in float32.
"""
import contextlib
import math
import types
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from mini_world import smollm2

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load(name_or_path=None, *, tiny=False, dtype=None, device=None):
    """(model, tokenizer) of a Hugging Face name or local folder; None: the offline default
    (SmolLM2-135M-Instruct); tiny=True: a tiny random Llama for tests (both from mini_world/smollm2.py).
    dtype: bfloat16 on GPU, float32 on CPU by default. The tokenizer pads on the left with pad = eos,
    so masks must never come from `!= pad`."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if tiny:
        model, tokenizer = smollm2.tiny(dtype)
    elif name_or_path is None:
        model, tokenizer = smollm2.load(dtype)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
        except OSError as e:
            raise FileNotFoundError(f"cannot load {name_or_path!r}: pass a local checkpoint folder (this machine "
                                    f"has no model hub), or None for the bundled SmolLM2-135M-Instruct ({e})") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer


def fast_bf16(device) -> bool:
    """Whether bfloat16 matmuls are fast on `device`: a GPU with them, or a CPU with AVX512-BF16 or AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def decoder_layers(model):
    """The repeated blocks: the units of FSDP sharding and of gradient checkpointing."""
    return model.get_decoder().layers


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B A x with W frozen and B zero at init (Hu et al. 2021). A and B are
    float32 and compute in the activations' dtype; without gradients that cast is cached until an
    optimizer step changes them (`_version`)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / r
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **kw))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **kw))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and PEFT do
        self._cast = None  # (key, A, B) in the activations' dtype, for no-grad calls

    def forward(self, x):  # (..., in) -> (..., out)
        A, B = self.lora_A, self.lora_B
        if torch.is_grad_enabled() or distributed():  # FSDP moves unsharded weights around: no cache
            a, b = A.to(x.dtype), B.to(x.dtype)
        else:
            key = (x.dtype, A.data_ptr(), A._version, B.data_ptr(), B._version)
            if self._cast is None or self._cast[0] != key:
                self._cast = (key, A.detach().to(x.dtype), B.detach().to(x.dtype))
            _, a, b = self._cast
        return self.base(x) + (x @ a.T @ b.T) * self.scale


def add_lora(model, r=16, alpha=32, targets=LORA_TARGETS):
    """Wrap every nn.Linear named one of `targets` and freeze all else. Call before `shard`;
    without it every parameter trains."""
    model.requires_grad_(False)
    wrapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, r, alpha))
                wrapped += 1
    if wrapped == 0:
        raise ValueError(f"add_lora: no nn.Linear named any of {targets} in {type(model).__name__}")


# Collectives: every rank calls them in the same order. They run whenever a process group exists,
# world size 1 included, and send CPU tensors, hence gloo beside NCCL (which serves FSDP).
def process_group_backend(cuda: bool) -> str:
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(value, dtype, op):
    if distributed():
        t = torch.tensor([value], dtype=dtype)
        dist.all_reduce(t, op=op)
        value = t.item()
    return value


def is_rank0() -> bool:
    return not distributed() or dist.get_rank() == 0


def any_rank(flag: bool) -> bool:
    return bool(_all_reduce(int(flag), torch.int64, dist.ReduceOp.MAX))


def max_over_ranks(n: int) -> int:
    return int(_all_reduce(int(n), torch.int64, dist.ReduceOp.MAX))


def sum_over_ranks(x: float) -> float:
    return float(_all_reduce(float(x), torch.float64, dist.ReduceOp.SUM))


def gather_lists(items: list) -> list:
    """Every rank's (picklable) list, concatenated in rank order."""
    if not distributed():
        return list(items)
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def enable_gradient_checkpointing(model):
    """Recompute each decoder layer in backward (non-reentrant, through HF's per-layer hook so
    FSDP2's hooks stay outside). HF checkpoints only in train mode, so this calls model.train()."""
    model.activation_checkpointing_enable({"use_reentrant": False})  # transformers 5 name
    model.train()


def shard(model, *, mixed_precision=False):
    """FSDP2: shard each decoder layer, then the root; a no-op without torch.distributed.
    mixed_precision: compute in bfloat16, reduce gradients in float32, store weights as they are."""
    if not distributed():
        return model
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mp = bf16 if mixed_precision else MixedPrecisionPolicy()
    for module in [*decoder_layers(model), model]:
        fully_shard(module, mp_policy=mp)
    # FSDP2 gathers the root's parameters only around forward() and registered methods; our chunked
    # log-probs call the trunk and the LM head separately (HF generate is registered in case it is used).
    model._loop_token_logprobs = types.MethodType(_token_logprobs, model)
    register_fsdp_forward_method(model, "_loop_token_logprobs")
    register_fsdp_forward_method(model, "generate")
    return model


@contextlib.contextmanager
def gathered(model):
    """Keep a sharded model's weights whole after their first forward (a sampling phase: no collectives
    per decode step), at the cost of one full copy per rank; resharded on exit. No-op if unsharded."""
    if not isinstance(model, FSDPModule):
        yield model
        return
    model.set_reshard_after_forward(False)
    try:
        yield model
    finally:
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # FSDP's default for the root (kept for backward)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def _chunk_logprobs(head, hidden, targets, temperature):
    """log softmax(head(hidden) / T)[target] for N positions; (N, V) logits live only here."""
    logits = head(hidden).float() / temperature  # (N, V)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)  # (N,)


def _token_logprobs(model, input_ids, attention_mask, temperature=1.0, chunk_size=512, positions=None):
    B, T = input_ids.shape
    # Positions from the mask, so left- and right-padded batches give the same numbers as unpadded.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state  # (B, T, H)
    # Position t predicts token t+1; it counts only if both are real tokens (and the caller asked for it).
    valid = (attention_mask[:, :-1] * attention_mask[:, 1:]).bool()  # (B, T-1)
    if positions is not None:
        valid = valid & positions  # (B, T-1)
    rows, targets = hidden[:, :-1][valid], input_ids[:, 1:][valid]  # (N, H), (N,)
    head = model.get_output_embeddings()
    # With gradients, each chunk's (N, V) logits are recomputed in backward instead of kept.
    score = partial(checkpoint, _chunk_logprobs, use_reentrant=False) if torch.is_grad_enabled() else _chunk_logprobs
    pieces = [score(head, rows[s : s + chunk_size], targets[s : s + chunk_size], temperature)
              for s in range(0, rows.shape[0], chunk_size)]
    out = hidden.new_zeros(B, T - 1, dtype=torch.float32)  # (B, T-1)
    if not pieces:  # nothing to score; still run the head once (times 0) so every rank's backward uses it
        return out + 0.0 * _chunk_logprobs(head, hidden[:1, 0], input_ids[:1, 0], temperature).sum()
    return out.masked_scatter(valid, torch.cat(pieces))


def token_logprobs(model, input_ids, attention_mask, temperature=1.0, chunk_size=512, positions=None):
    """log p(x_{t+1} | x_<=t) at temperature T: (B, T) ids -> (B, T-1) float32, 0.0 at padding (left or right).

    The LM head and float32 log-softmax run `chunk_size` positions at a time, so the (B, T, V) logits
    never exist, forward or backward. positions: optional (B, T-1) bool, the only positions put through
    the head (RL needs the agent's tokens only); the rest get 0.0.
    """
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids and attention_mask must both be (B, T): "
                         f"{tuple(input_ids.shape)} vs {tuple(attention_mask.shape)}")
    fn = getattr(model, "_loop_token_logprobs", None)  # set by shard(): runs inside FSDP's hooks
    args = (input_ids, attention_mask, temperature, chunk_size, positions)
    return _token_logprobs(model, *args) if fn is None else fn(*args)


def export_state_dict(model):
    """The full state dict under the base model's names, LoRA merged (W + alpha/r * B A); the model
    is untouched. Under FSDP every rank calls it: rank 0 gets CPU tensors, the others {}."""
    if distributed():
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = {k: v.cpu() for k, v in model.state_dict().items()}
    out = {}
    for key, value in sd.items():
        if ".lora_A" in key or ".lora_B" in key:
            continue
        prefix = key[: -len("base.weight")]
        if key.endswith(".base.weight") and prefix + "lora_A" in sd:
            scale = model.get_submodule(prefix[:-1]).scale
            value = value + scale * (sd[prefix + "lora_B"].float() @ sd[prefix + "lora_A"].float()).to(value.dtype)
        out[key.replace(".base.", ".")] = value.detach()
    return out


def save(model, tokenizer, path):
    """A checkpoint that `AutoModelForCausalLM.from_pretrained(path)` opens directly, LoRA merged.
    Under FSDP every rank must call this (the gather is a collective); rank 0 writes."""
    state = export_state_dict(model)
    if not is_rank0():
        return
    with torch.device("meta"):  # the plain base architecture, to hold `state` (unsaved buffers need no data)
        plain = AutoModelForCausalLM.from_config(model.config)
    result = plain.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(plain, "_tied_weights_keys", None) or ()) if model.config.tie_word_embeddings else set()
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise ValueError(f"weights the base architecture does not have {result.unexpected_keys[:5]} "
                         f"or lacks {sorted(set(result.missing_keys) - tied)[:5]}")
    plain.tie_weights()
    plain.save_pretrained(path)
    tokenizer.save_pretrained(path)
