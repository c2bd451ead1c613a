"""FedSoup's state and checkpoints: what a restarted server needs to continue exactly.

The state (``FedSoup.state_dict()``) is a nested dict of plain values and tensors:

* ``round``: the last completed server round ``t``;
* ``global``: the global model ``x_t`` (every array, dtypes kept);
* ``stew``: the ServerStew's ``state_dict()`` (optimizer name, parameter keys, shapes
  and dtypes, ``torch.optim`` state), or ``None`` while it has not stepped;
* ``rng``: ``{"seed": s}``: round ``t``'s AME seed is derived from ``(s, t)``, so this
  is the whole random state;
* ``settings``: the soup/stew/order settings, for a reader of the checkpoint, and
  ``lora_mode``, which a restarted FedSoup checks (:attr:`RunState.lora_mode`).

With a checkpoint directory it is written after every round by
:func:`fedsoup.state.save_checkpoint` (safetensors + JSON, no pickle; the JSON is
replaced atomically, so a crash leaves the previous round's checkpoint intact; a
checksum per tensor file is verified when the checkpoint is read back).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedsoup.errors import StateError
from fedsoup.lora import LORA_A_SUFFIX
from fedsoup.state import STATE_JSON, has_checkpoint, load_checkpoint, orphan_tensor_files, save_checkpoint

__all__ = ["STATE_FORMAT", "RunState", "read_checkpoint", "write_checkpoint"]

STATE_FORMAT = "fedsoup.strategies.FedSoup"


@dataclass
class RunState:
    """The parsed, checked content of a FedSoup state dict."""

    round: int
    seed: int
    global_model: dict[str, torch.Tensor] | None
    stew: dict[str, Any] | None
    settings: dict[str, Any]

    @property
    def lora_mode(self) -> str | None:
        """The LoRA mode the state was written under: ``"factors"``, ``"products"``, or ``None``
        (no ``adapter_config``: arrays merged as plain tensors)."""
        if "lora_mode" in self.settings:
            return self.settings["lora_mode"]
        # Written before lora_mode was recorded: "lora" held LoraOptions.describe(),
        # "LoRA <mode> (r=...)", or None (older states have no "lora" at all).
        described = self.settings.get("lora")
        if described is None:
            return None
        words = str(described).split()
        return words[1] if len(words) > 1 and words[0] == "LoRA" else str(described)

    def to_dict(self) -> dict[str, Any]:
        """Tensors by reference, as ``torch.nn.Module.state_dict`` returns them."""
        return {
            "format": STATE_FORMAT,
            "round": self.round,
            "rng": {"seed": self.seed},
            "global": None if self.global_model is None else dict(self.global_model),
            "stew": self.stew,
            "settings": self.settings,
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> RunState:
        """Check a state dict; :class:`~fedsoup.errors.StateError` naming what is wrong (``key``: the entry)."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise StateError(f"not a FedSoup state (missing format {STATE_FORMAT!r})", key="format")
        round_ = state.get("round")
        if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
            raise StateError(f"FedSoup state: invalid round {round_!r}", key="round")
        global_ = state.get("global")
        stew = state.get("stew")
        if stew is not None and stew.get("state") is not None:
            if global_ is None:
                raise StateError("FedSoup state: a stew state without a global model", key="global")
            # A LoRA 'products' stew steps on ΔW: its arrays are named by module path, whose
            # factors '<path>.lora_A.weight'/'.lora_B.weight' are in the global model.
            missing = [k for k in stew.get("keys", []) if k not in global_ and k + LORA_A_SUFFIX not in global_]
            if missing:
                raise StateError(
                    f"FedSoup state: stew array {missing[0]!r} is not in the global model", key=missing[0], what="array"
                )
        return cls(
            round=round_,
            seed=int(state.get("rng", {}).get("seed", 0)),
            global_model=None if global_ is None else {str(k): torch.as_tensor(v).clone() for k, v in global_.items()},
            stew=None if stew is None else dict(stew),
            settings=dict(state.get("settings", {})),
        )


def read_checkpoint(directory: Path) -> RunState | None:
    """The state in ``directory``; ``None`` if it holds no checkpoint yet.

    Raises :class:`~fedsoup.errors.CheckpointError` for a damaged checkpoint (checksum
    mismatch) and for tensor files without their ``state.json``: restarting at round 1
    there would silently throw away a run's progress.
    """
    if not has_checkpoint(directory) and not orphan_tensor_files(directory):
        return None
    try:
        return RunState.from_dict(load_checkpoint(directory))
    except StateError as error:
        raise error.at(str(Path(directory) / STATE_JSON)) from None


def write_checkpoint(directory: Path, state: Mapping[str, Any], server_round: int) -> None:
    """Commit ``state`` as the checkpoint of ``server_round`` (atomically)."""
    save_checkpoint(directory, state, tag=f"round-{server_round:05d}", metadata={"round": str(server_round)})
