"""The language-model task (``task = "lm"``): a tiny Llama over bytes, a centrally trained base, LoRA clients.

Offline throughout: the model is ``transformers.LlamaForCausalLM`` built from a
``LlamaConfig`` with random weights and a 256-token byte-level vocabulary (token = byte,
so no tokenizer file exists); the text is Python's standard library
(:mod:`simulations.lm_corpus`). The base is trained centrally on the ``public`` group for
``lm-base-steps`` AdamW steps, once, from a fixed seed (it plays the pretrained checkpoint
FlowerTune downloads; every run seed shares it), and cached on disk as safetensors under
``lm-cache-dir`` keyed by everything it depends on. Clients then fine-tune a PEFT LoRA
adapter on their own group and reply with ``get_peft_model_state_dict`` (FlowerTune's
reply); the server merges adapters only.

The metric is perplexity ``exp(mean NLL per byte)`` on each client's held-out text, and its
mean and worst over clients.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fedsoup.atomic import atomic_path
from simulations.config import SimConfig
from simulations.lm_corpus import ClientText, client_texts, corpus_identity, public_text

__all__ = ["TARGET_MODULES", "BASE_SEED", "model_config", "lora_config", "adapter_config_dict", "base_state",
           "as_tokens", "mixed_batch", "base_model", "adapter_model", "initial_adapter", "adapter_state", "train_steps", "optimizer_steps", "mean_nll", "evaluate_texts",
           "texts_of", "central_rows"]

#: Every linear map of the attention and the MLP carries an adapter.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: The base model's seed: one base for every run seed, as one pretrained checkpoint would be.
BASE_SEED = 1234
_BASE_LR = 3e-3
_BASE_BATCH = 16


def model_config(cfg: SimConfig):
    """The tiny byte-level Llama: ``lm-hidden`` wide, ``lm-layers`` deep, context ``lm-seq-len``."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=256, hidden_size=cfg.lm_hidden, intermediate_size=2 * cfg.lm_hidden,
                       num_hidden_layers=cfg.lm_layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=cfg.lm_seq_len, bos_token_id=None, eos_token_id=None,
                       pad_token_id=None, tie_word_embeddings=True)


def adapter_config_dict(cfg: SimConfig) -> dict[str, Any]:
    """The server's adapter configuration (``adapter_config.json`` fields FedSoup reads)."""
    return {"peft_type": "LORA", "r": cfg.lora_r, "lora_alpha": cfg.lora_alpha,
            "target_modules": list(TARGET_MODULES), "use_rslora": False, "bias": "none"}


def lora_config(cfg: SimConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=list(TARGET_MODULES),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")


def as_tokens(text: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def sample_windows(tokens: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``seq_len + 1`` tokens (inputs and their next tokens)."""
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch,), generator=gen)
    return torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])


def mixed_batch(streams: Sequence[torch.Tensor], batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` windows, each from a stream drawn in proportion to the streams' lengths."""
    sizes = torch.tensor([float(len(s)) for s in streams])
    which = torch.multinomial(sizes, batch, replacement=True, generator=gen)
    return torch.cat([sample_windows(streams[i], int((which == i).sum()), seq_len, gen)
                      for i in range(len(streams)) if int((which == i).sum())])


def train_steps(model: torch.nn.Module, streams: Sequence[torch.Tensor], *, steps: int, lr: float, batch: int,
                seq_len: int, seed: int) -> float:
    """``steps`` AdamW steps (a fresh optimizer) on the trainable parameters; each batch's windows
    come from ``streams`` chosen in proportion to their lengths. Returns the mean loss of the steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    return optimizer_steps(model, opt, streams, steps=steps, batch=batch, seq_len=seq_len,
                           gen=torch.Generator().manual_seed(seed))


def optimizer_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, streams: Sequence[torch.Tensor], *,
                    steps: int, batch: int, seq_len: int, gen: torch.Generator) -> float:
    """``steps`` steps of ``opt`` on next-byte cross-entropy; the mean loss of the steps."""
    model.train()
    total = 0.0
    for _ in range(steps):
        loss = _next_byte_loss(model, mixed_batch(streams, batch, seq_len, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item()
    return total / max(steps, 1)


@torch.no_grad()
def mean_nll(model: torch.nn.Module, text: bytes, seq_len: int, max_bytes: int) -> float:
    """Mean negative log-likelihood per predicted byte of ``text``: ``max_bytes // seq_len`` windows
    of ``seq_len + 1`` bytes spread evenly over the whole text (a group's held-out text is the tails
    of all its files, so every file counts), or every non-overlapping window of a shorter text."""
    tokens = as_tokens(text)
    fits = (len(tokens) - 1) // seq_len
    if fits < 1:
        raise ValueError(f"held-out text of {len(tokens)} bytes is shorter than one window of {seq_len + 1}")
    n = max(1, min(fits, max_bytes // seq_len))
    starts = torch.linspace(0, len(tokens) - seq_len - 1, n).long() if n < fits else torch.arange(n) * seq_len
    windows = torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])
    model.eval()
    return float(_next_byte_loss(model, windows))


def _next_byte_loss(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every window's bytes ``1..L`` given the bytes before them."""
    logits = model(input_ids=windows[:, :-1], use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))


def texts_of(cfg: SimConfig) -> list[ClientText]:
    return client_texts(cfg.num_partitions, cfg.lm_heldout)


def _cache_dir(cfg: SimConfig) -> Path:
    if cfg.lm_cache_dir:
        return Path(cfg.lm_cache_dir)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedsoup" / "lm-base"


def base_state(cfg: SimConfig) -> dict[str, torch.Tensor]:
    """The base model's weights: trained once on the public group, then read from the cache.

    The cache file's name hashes the model config, the base's training settings and the
    corpus identity (Python version, corpus hash), so a change to any of them trains anew.
    Written atomically: a reader never sees half a file.
    """
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM

    key = json.dumps({"model": model_config(cfg).to_dict(), "steps": cfg.lm_base_steps, "lr": _BASE_LR,
                      "batch": _BASE_BATCH, "seq": cfg.lm_seq_len, "seed": BASE_SEED,
                      "corpus": corpus_identity()}, sort_keys=True, default=str)
    path = _cache_dir(cfg) / f"base-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if path.is_file():
        return load_file(str(path))
    torch.manual_seed(BASE_SEED)
    model = LlamaForCausalLM(model_config(cfg))
    train_steps(model, [as_tokens(public_text())], steps=cfg.lm_base_steps, lr=_BASE_LR, batch=_BASE_BATCH,
                seq_len=cfg.lm_seq_len, seed=BASE_SEED)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}  # tied to the embedding
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    return state


def base_model(cfg: SimConfig, base: dict[str, torch.Tensor]):
    """The base ``LlamaForCausalLM`` with the weights of :func:`base_state` (the head tied to the embedding)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(model_config(cfg))
    missing, unexpected = model.load_state_dict(base, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise ValueError(f"base weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    return model


def adapter_model(cfg: SimConfig, base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor] | None = None,
                  *, seed: int | None = None):
    """The base with a fresh LoRA adapter (``seed``: its A's initialisation), then ``adapter`` loaded."""
    from peft import get_peft_model, set_peft_model_state_dict

    model = base_model(cfg, base)
    torch.manual_seed(cfg.seed if seed is None else seed)
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for a user to do
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, lora_config(cfg))
    if adapter is not None:
        result = set_peft_model_state_dict(peft_model, adapter)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"adapter keys the model does not have: {result.unexpected_keys[:3]}")
    return peft_model


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The reply: ``get_peft_model_state_dict`` (keys without the adapter's name), as FlowerTune sends."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def initial_adapter(cfg: SimConfig, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Round 0's global adapter: PEFT's initialisation (A random from ``seed``, B = 0)."""
    return adapter_state(adapter_model(cfg, base, seed=cfg.seed))


def evaluate_texts(model, texts: Sequence[ClientText], cfg: SimConfig) -> dict[str, float]:
    """Held-out perplexity per client (``test-perplexity-<group>``), their mean (``test-perplexity``),
    the worst client's (``test-perplexity-worst``) and the mean NLL per byte (``test-loss``)."""
    nll = {t.group: mean_nll(model, t.heldout, cfg.lm_seq_len, cfg.lm_eval_bytes) for t in texts}
    ppl = {g: math.exp(v) for g, v in nll.items()}
    metrics = {f"test-perplexity-{g}": p for g, p in ppl.items()}
    metrics["test-perplexity"] = sum(ppl.values()) / len(ppl)
    metrics["test-perplexity-worst"] = max(ppl.values())
    metrics["test-loss"] = sum(nll.values()) / len(nll)
    return metrics


def central_rows(cfg: SimConfig, on_round: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """The upper reference: one LoRA adapter trained on every client's training text pooled.

    As many AdamW steps per "round" as the federation takes in a round (clients × local
    steps, same batch size and learning rate, one optimizer throughout), evaluated like the
    global adapter after every round.
    """
    import time

    torch.set_num_threads(1)
    texts = texts_of(cfg)
    model = adapter_model(cfg, base_state(cfg), seed=cfg.seed)
    streams = [as_tokens(t.train) for t in texts]
    rows = [{"round": 0, **evaluate_texts(model, texts, cfg), "elapsed-s": 0.0}]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    for rnd in range(1, cfg.num_server_rounds + 1):
        steps = cfg.lm_local_steps * len(texts)
        loss = optimizer_steps(model, opt, streams, steps=steps, batch=cfg.batch_size, seq_len=cfg.lm_seq_len, gen=gen)
        rows.append({"round": rnd, **evaluate_texts(model, texts, cfg), "clients-train-loss": loss,
                     "elapsed-s": round(time.perf_counter() - start, 3)})
        if on_round is not None:
            on_round()
    return rows
