"""Tiny GPT-2 and Llama models and PEFT LoRA adapters built from configs (no download), and the
hand computation every LoRA merge is tested against: ``Σ_i ω_i s_i B_i A_i`` in plain torch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

transformers = __import__("pytest").importorskip("transformers")
peft = __import__("pytest").importorskip("peft")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

GPT2_TARGETS = ["c_attn"]
LLAMA_TARGETS = ["q_proj", "v_proj"]


def gpt2_base() -> GPT2LMHeadModel:
    torch.manual_seed(1234)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def llama_base() -> LlamaForCausalLM:
    torch.manual_seed(1234)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


BASES = {"gpt2": (gpt2_base, GPT2_TARGETS), "llama": (llama_base, LLAMA_TARGETS)}


def make_adapter(directory: Path, family: str = "gpt2", *, seed: int, r: int = 4, lora_alpha: float = 8,
                 use_rslora: bool = False, drift_from: Path | None = None, drift: float = 0.1,
                 **config) -> Path:
    """Save a PEFT adapter with random A and B (``init_lora_weights=False``), or, with
    ``drift_from``, that adapter's tensors moved by ``drift`` relative noise."""
    factory, targets = BASES[family]
    config.setdefault("target_modules", targets)
    base = factory()
    torch.manual_seed(seed)  # after the base is built (its own seed), so adapters differ
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=lora_alpha, use_rslora=use_rslora,
                                                 init_lora_weights=False, **config))
    if drift_from is not None:
        source = load_file(str(Path(drift_from) / "adapter_model.safetensors"))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_" in name:
                    key = name.replace(".default", "")
                    base = source[key]
                    param.copy_(base + drift * base.std() * torch.randn(base.shape, generator=generator))
    model.save_pretrained(str(directory))
    return Path(directory)


def read(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config = json.loads((Path(directory) / "adapter_config.json").read_text())
    return config, load_file(str(Path(directory) / "adapter_model.safetensors"))


def hand_scale(config: dict, rank: int) -> float:
    return config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)


def hand_products(directories, weights=None) -> dict[str, torch.Tensor]:
    """``{module path: Σ_i ω_i s_i B_i A_i}`` in float64, straight from the files."""
    weights = [1.0] * len(directories) if weights is None else list(weights)
    omega = [w / sum(weights) for w in weights]
    total: dict[str, torch.Tensor] = {}
    for w, directory in zip(omega, directories):
        config, tensors = read(directory)
        for key, a in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            path = key[: -len(".lora_A.weight")]
            b = tensors[path + ".lora_B.weight"]
            delta = w * hand_scale(config, a.shape[0]) * (b.double() @ a.double())
            total[path] = total[path] + delta if path in total else delta
    return total


def products_of(directory: Path) -> dict[str, torch.Tensor]:
    """``{module path: s·B·A}`` of one adapter file, with ``s`` from its own config."""
    return hand_products([directory])


def peft_deltas(model: PeftModel, adapter: str = "default") -> dict[str, torch.Tensor]:
    """PEFT's own ``get_delta_weight`` of every LoRA layer, in the (d_out, d_in) layout of B·A."""
    deltas = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and adapter in getattr(module, "lora_A", {}):
            delta = module.get_delta_weight(adapter).double()
            if getattr(module, "fan_in_fan_out", False):
                delta = delta.T
            deltas[name] = delta
    return deltas


def relative_error(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x.double() - y.double()) / torch.linalg.matrix_norm(y.double()))
