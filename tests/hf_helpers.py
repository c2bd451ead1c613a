"""Tiny transformers language models built from configs (no hub), saved in every Hugging Face form.

transformers is a test dependency (the ``hf`` extra); fedsoup itself never imports it.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

VOCAB = 256  # one token per byte


def tiny_config(arch: str):
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                       bos_token_id=0, eos_token_id=0)
    if arch == "llama":
        return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch)).to(dtype).eval()
    with torch.no_grad():  # layer norms start at 1/0: make every tensor differ across models
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: one token per byte, built offline."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=alphabet[0])


def state_dict_as_saved(model) -> dict[str, torch.Tensor]:
    """The model's tensors as save_pretrained writes them (tied copies dropped, contiguous)."""
    folder_state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tied = getattr(model, "_tied_weights_keys", None) or {}
    for key in (tied if isinstance(tied, (list, dict, set, tuple)) else []):
        if model.config.tie_word_embeddings and key in folder_state:
            folder_state.pop(key)
    return folder_state


def save_in_form(model, folder: Path, form: str, tokenizer=None) -> str:
    """Save ``model`` as transformers would and return the input path of the given form.

    Forms: ``dir``, ``safetensors`` (the weights file), ``sharded`` (directory of shards),
    ``index`` (the safetensors index), ``bin`` (``pytorch_model.bin``), ``bin-index``
    (sharded ``.bin`` with ``pytorch_model.bin.index.json``), ``bin-tied`` (``pytorch_model.bin``
    holding the tied copies too, GPT-2's ``lm_head.weight`` beside ``transformer.wte.weight``,
    sharing its storage: ``torch.save(model.state_dict())``, as transformers 4.x's
    ``save_pretrained(safe_serialization=False)`` and most training scripts wrote it).
    """
    folder = Path(folder)
    if form in ("dir", "safetensors"):
        model.save_pretrained(folder)
    elif form in ("sharded", "index"):
        model.save_pretrained(folder, max_shard_size="20KB")
        assert (folder / "model.safetensors.index.json").is_file()
    elif form in ("bin", "bin-index", "bin-tied"):
        # transformers 5 no longer writes .bin: torch.save in its layout, as 4.x did.
        folder.mkdir(parents=True)
        model.config.architectures = [type(model).__name__]  # as save_pretrained records it
        model.config.save_pretrained(folder)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(folder)
        state = state_dict_as_saved(model) if form != "bin-tied" else model.state_dict()
        if form in ("bin", "bin-tied"):
            torch.save(state, folder / "pytorch_model.bin")
        else:
            keys = list(state)
            halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
            weight_map = {}
            for i, part in enumerate(halves, start=1):
                name = f"pytorch_model-{i:05d}-of-{len(halves):05d}.bin"
                torch.save({k: state[k] for k in part}, folder / name)
                weight_map.update(dict.fromkeys(part, name))
            (folder / "pytorch_model.bin.index.json").write_text(
                json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    else:
        raise ValueError(form)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return str({
        "dir": folder, "sharded": folder, "safetensors": folder / "model.safetensors",
        "index": folder / "model.safetensors.index.json", "bin": folder / "pytorch_model.bin",
        "bin-tied": folder / "pytorch_model.bin", "bin-index": folder / "pytorch_model.bin.index.json",
    }[form])


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# ----------------------------------------------------------------- the hand-written rounding reference

# (significand bits including the hidden one, smallest normal exponent, largest finite value)
FORMATS = {
    torch.bfloat16: (8, -126, Fraction(2**127) * (2 - Fraction(1, 2**7))),
    torch.float16: (11, -14, Fraction(65504)),
    torch.float8_e4m3fn: (4, -6, Fraction(448)),
    torch.float8_e5m2: (3, -14, Fraction(57344)),
    torch.float32: (24, -126, Fraction(2**128) - Fraction(2**104)),
}


def round_fraction(value: Fraction, dtype: torch.dtype) -> float:
    """``value`` rounded once to ``dtype``, to nearest, ties to even (IEEE 754), as a Python float."""
    precision, emin, largest = FORMATS[dtype]
    if value == 0:
        return 0.0
    sign, magnitude = (-1 if value < 0 else 1), abs(value)
    exponent = magnitude.numerator.bit_length() - magnitude.denominator.bit_length()
    if Fraction(2) ** exponent > magnitude:  # exponent = floor(log2(magnitude))
        exponent -= 1
    if Fraction(2) ** (exponent + 1) <= magnitude:
        exponent += 1
    ulp = Fraction(2) ** (max(exponent, emin) - precision + 1)
    scaled = magnitude / ulp
    whole = scaled.numerator // scaled.denominator
    rest = scaled - whole
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and whole % 2 == 1):
        whole += 1
    rounded = whole * ulp
    if rounded > largest:
        return sign * float("inf")
    return sign * float(rounded)


def exact_mean(tensors: list[torch.Tensor], weights: list[int] | None = None) -> list[Fraction]:
    """Σ w_i x_i / Σ w_i per element, exactly."""
    weights = weights or [1] * len(tensors)
    columns = [t.double().flatten().tolist() for t in tensors]
    total = sum(weights)
    return [sum(Fraction(w) * Fraction(x) for w, x in zip(weights, values)) / total for values in zip(*columns)]


def correctly_rounded_mean(tensors: list[torch.Tensor], weights: list[int] | None = None,
                           dtype: torch.dtype | None = None) -> torch.Tensor:
    """The exact weighted mean rounded once to ``dtype`` (default: the inputs'): the hand-written reference."""
    dtype = dtype or tensors[0].dtype
    values = [round_fraction(v, dtype) for v in exact_mean(tensors, weights)]
    return torch.tensor(values, dtype=torch.float64).reshape(tensors[0].shape).to(dtype)
