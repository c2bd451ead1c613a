"""PEFT LoRA adapter configurations (``adapter_config.json``) read by their documented format.

PEFT's LoRA layer computes ``h = W x + s · B A x`` with ``A`` of shape ``(r, d_in)``,
``B`` of shape ``(d_out, r)`` and the scale

    s = lora_alpha / r          (plain LoRA)
    s = lora_alpha / √r         (rsLoRA, ``use_rslora: true``)

where ``r`` and ``lora_alpha`` of a module come from ``rank_pattern``/``alpha_pattern``
when a pattern matches its name (relative to the base model, PEFT's
``get_pattern_key``: ``re.match(rf"(.*\\.)?({pattern})$", name)``), else from ``r`` and
``lora_alpha``. Only plain LoRA (and rsLoRA) on linear layers is merged here; the
variants that change this formula are refused by name (:data:`REFUSED_FIELDS`).
Nothing here imports PEFT.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedsoup.errors import MergeInputError
from fedsoup.io.resolve import ADAPTER_CONFIG

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "REFUSED_FIELDS",
    "LoraSettings",
    "parse_adapter_config",
    "pattern_value",
    "output_adapter_config",
]

ADAPTER_CONFIG_NAME = ADAPTER_CONFIG

# Config fields that make an adapter something other than s·B·A on a linear layer, with
# the name users know them by. Any of these set to a non-default value is refused.
REFUSED_FIELDS: dict[str, str] = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA bias (lora_bias)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "layer replication (layer_replication)",
    "arrow_config": "Arrow routing (arrow_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "megatron_config": "Megatron parallel layers (megatron_config)",
}


@dataclass(frozen=True)
class LoraSettings:
    """What the merge needs from one ``adapter_config.json`` (the rest is carried over as is)."""

    r: int
    lora_alpha: float
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    use_rslora: bool
    fan_in_fan_out: bool
    target_modules: Any  # a list/set of names (compared as a set), or a regex string
    modules_to_save: frozenset[str]
    base_model: str | None
    raw: Mapping[str, Any]  # the whole config, as read

    def rank(self, module: str) -> int:
        """``r`` of ``module`` (its name relative to the base model)."""
        return int(pattern_value(self.rank_pattern, module, self.r))

    def alpha(self, module: str) -> float:
        return float(pattern_value(self.alpha_pattern, module, self.lora_alpha))

    def scale(self, module: str, rank: int | None = None) -> float:
        """``s = α/r``, or ``α/√r`` with rsLoRA (``rank``: the tensors' rank, else the config's)."""
        r = self.rank(module) if rank is None else rank
        alpha = self.alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    @property
    def target_set(self) -> Any:
        """``target_modules`` in a form that compares as PEFT means it (a set, or the regex string)."""
        if isinstance(self.target_modules, (list, tuple, set, frozenset)):
            return frozenset(str(t) for t in self.target_modules)
        return self.target_modules


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern that matches the end of ``module``'s dotted name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _positive_int(config: Mapping[str, Any], field: str, where: dict) -> int:
    value = config.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MergeInputError(f"must be a positive integer in {ADAPTER_CONFIG_NAME}, got {value!r}", field=field,
                              **where)
    return value


def _finite_number(value: Any, field: str, where: dict) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise MergeInputError(f"must be a positive number in {ADAPTER_CONFIG_NAME}, got {value!r}", field=field,
                              **where)
    return float(value)


def _pattern(config: Mapping[str, Any], field: str, where: dict, integer: bool) -> dict[str, Any]:
    value = config.get(field) or {}
    if not isinstance(value, Mapping):
        raise MergeInputError(f"must be an object in {ADAPTER_CONFIG_NAME}, got {value!r}", field=field, **where)
    checked = {}
    for key, item in value.items():
        if integer:
            checked[str(key)] = _positive_int({field: item}, field, where)
        else:
            checked[str(key)] = _finite_number(item, field, where)
    return checked


def _is_set(value: Any) -> bool:
    """A config field left at PEFT's default (None, False, empty, ``{}``) is unset."""
    return not (value is None or value is False or value == {} or value == [] or value == "")


def parse_adapter_config(config: Mapping[str, Any], *, ingredient: int | None = None,
                         path: str | None = None) -> LoraSettings:
    """Check one adapter's config and return its :class:`LoraSettings`.

    Raises :class:`~fedsoup.errors.MergeInputError` naming the ingredient (or file) and
    the field for anything that is not plain LoRA/rsLoRA: another ``peft_type``, a
    variant of :data:`REFUSED_FIELDS`, a missing or non-positive ``r``/``lora_alpha``.
    """
    where = {"ingredient": ingredient, "path": path}
    if not isinstance(config, Mapping):
        raise MergeInputError(f"{ADAPTER_CONFIG_NAME} is not a JSON object", **where)
    peft_type = config.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise MergeInputError(f"{peft_type!r} in {ADAPTER_CONFIG_NAME}: only LORA adapters are merged",
                              field="peft_type", **where)
    for field, name in REFUSED_FIELDS.items():
        if _is_set(config.get(field)):
            raise MergeInputError(f"set in {ADAPTER_CONFIG_NAME}: {name} is not supported (only plain LoRA and "
                                  "rsLoRA on linear layers are merged)", field=field, **where)
    if config.get("bias", "none") not in ("none", None):
        raise MergeInputError(f"{config.get('bias')!r} in {ADAPTER_CONFIG_NAME}: adapters that train the base "
                              "model's biases are not supported (use bias='none')", field="bias", **where)
    r = _positive_int(config, "r", where)
    alpha = _finite_number(config.get("lora_alpha", 8), "lora_alpha", where)
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets))):
        raise MergeInputError(f"must be a list of names or a regex in {ADAPTER_CONFIG_NAME}, got {targets!r}",
                              field="target_modules", **where)
    to_save = config.get("modules_to_save") or []
    if not isinstance(to_save, (list, tuple)) or not all(isinstance(m, str) for m in to_save):
        raise MergeInputError(f"must be a list of names in {ADAPTER_CONFIG_NAME}, got {to_save!r}",
                              field="modules_to_save", **where)
    for flag in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(config.get(flag, False), bool):
            raise MergeInputError(f"must be true or false in {ADAPTER_CONFIG_NAME}, got {config.get(flag)!r}",
                                  field=flag, **where)
    base = config.get("base_model_name_or_path")
    return LoraSettings(
        r=r, lora_alpha=alpha,
        rank_pattern=_pattern(config, "rank_pattern", where, integer=True),
        alpha_pattern=_pattern(config, "alpha_pattern", where, integer=False),
        use_rslora=bool(config.get("use_rslora", False)),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        target_modules=targets,
        modules_to_save=frozenset(to_save),
        base_model=None if base is None else str(base),
        raw=dict(config),
    )


def output_adapter_config(template: LoraSettings, ranks: Mapping[str, int],
                          extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config of a merged adapter: ``template``'s, with the ranks of the written tensors.

    ``ranks`` maps each module (relative name) to the rank written. The most common rank
    becomes ``r``; a module of another rank gets an exact ``rank_pattern`` entry (its name,
    regex-escaped and anchored by PEFT's own ``(.*\\.)?(...)$``). ``lora_alpha``,
    ``alpha_pattern`` and ``use_rslora`` are the template's, so the writer scales each
    module's ``B`` by ``1/s`` computed from this very config (:func:`parse_adapter_config`).
    ``extra`` overrides fields. (The merge's own record goes to the weights file's
    metadata: PEFT's ``LoraConfig`` refuses unknown fields.)
    """
    config = dict(template.raw)
    counts: dict[int, int] = {}
    for rank in ranks.values():
        counts[rank] = counts.get(rank, 0) + 1
    common = max(sorted(counts), key=lambda rank: counts[rank]) if counts else template.r
    config["r"] = common
    config["rank_pattern"] = {re.escape(module): rank for module, rank in ranks.items() if rank != common}
    # alpha per module stays the template's: make the patterns exact per module as well,
    # since the rank pattern may now name modules the alpha pattern matched differently.
    config["alpha_pattern"] = {
        re.escape(module): template.alpha(module)
        for module in ranks if template.alpha(module) != template.lora_alpha
    }
    for key, value in (extra or {}).items():
        config[key] = value
    return config

