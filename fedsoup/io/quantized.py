"""Quantized checkpoints are refused: averaging packed integers or per-block scales is no average.

A GPTQ or AWQ checkpoint stores each linear weight as packed int32 ``qweight``/``qzeros``
and float ``scales``; bitsandbytes as int8/uint8 ``weight`` beside ``SCB`` or
``absmax``/``quant_map``/``quant_state``; FP8 checkpoints with scales as float8 ``weight``
beside ``weight_scale`` (``weight_scale_inv``, ``input_scale``); compressed-tensors as
``weight_packed``/``weight_scale``/``weight_zero_point``. The weight a layer uses is a
function of several of these tensors together, so no tensor may be averaged on its own:
such inputs must be dequantized first. They are recognised by what they hold (tensor
names and dtypes), and by the ``quantization_config`` (or ``compression_config``) a
Hugging Face ``config.json`` declares.
"""

from __future__ import annotations

from collections.abc import Mapping

from fedsoup.io.formats import TensorInfo

__all__ = ["declared_quantization", "quantized_layout", "DEQUANTIZE_HINT"]

DEQUANTIZE_HINT = (
    "dequantize first (e.g. load with transformers and save_pretrained the dequantized model in "
    "float32, bfloat16 or float16), merge, then quantize the merge"
)
# The last component of a tensor name that only quantized layouts use.
_QUANTIZED_SUFFIXES = {
    "qweight": "GPTQ/AWQ", "qzeros": "GPTQ/AWQ", "g_idx": "GPTQ",
    "SCB": "bitsandbytes 8-bit", "weight_format": "bitsandbytes 8-bit",
    "absmax": "bitsandbytes 4-bit", "quant_map": "bitsandbytes 4-bit", "nested_absmax": "bitsandbytes 4-bit",
    "weight_scale": "FP8/compressed-tensors", "weight_scale_inv": "FP8", "input_scale": "FP8",
    "weight_packed": "compressed-tensors", "weight_zero_point": "compressed-tensors",
}


def declared_quantization(config: Mapping) -> str | None:
    """The quantization a ``config.json`` declares (``"gptq"``, ``"awq"``, ``"fp8"``...), or ``None``."""
    for field in ("quantization_config", "compression_config"):
        declared = config.get(field)
        if declared:
            method = declared.get("quant_method") or declared.get("format") if isinstance(declared, Mapping) else None
            return f"{field} {method!r}" if method else field
    return None


def quantized_layout(infos: Mapping[str, TensorInfo]) -> tuple[str, str] | None:
    """``(tensor name, kind)`` of the first tensor only a quantized layout holds, or ``None``."""
    for key in infos:
        last = key.rsplit(".", 1)[-1]
        if last in _QUANTIZED_SUFFIXES:
            return key, _QUANTIZED_SUFFIXES[last]
        if "quant_state" in last:
            return key, "bitsandbytes 4-bit"
    return None
