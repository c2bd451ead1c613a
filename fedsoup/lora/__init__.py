"""LoRA adapters merged on purpose (docs/design.md §2.6): PEFT adapter files in and out,
merged as factors or as the products ``s·B·A`` they stand for, the error always measured.

Pure functions over ``dict[str, Tensor]``; no PEFT import: adapter files are read by
PEFT's documented format (``adapter_config.json`` + ``adapter_model.safetensors``/``.bin``).

- :mod:`fedsoup.lora.config`: ``adapter_config.json`` → :class:`LoraSettings` (scales, refusals).
- :mod:`fedsoup.lora.pairs`: a state dict ↔ LoRA pairs per module (key suffixes, dense ``s·B·A``).
- :mod:`fedsoup.lora.linalg`: norms and SVDs of products held as factors.
- :mod:`fedsoup.lora.checks`: refusals (adapters that do not fit together, mode, rank).
- :mod:`fedsoup.lora.measure`: the stacked factors of a soup of products; the factor/product error ``e_m``.
- :mod:`fedsoup.lora.modes`: the ``factors`` and ``products`` merges.
- :mod:`fedsoup.lora.into_base`: the merged update added to the base model's weights, tensor by tensor.
- :mod:`fedsoup.lora.report`: :class:`AdapterMerge` and :class:`LoraReport`.
- :mod:`fedsoup.lora.files`: adapter directories read and written.
- :mod:`fedsoup.lora.driver`: ``merge_files`` on adapters (files in, a directory out).
"""

from fedsoup.lora.config import ADAPTER_CONFIG_NAME, LoraSettings, parse_adapter_config
from fedsoup.lora.files import load_adapter, read_adapter, stream_model, write_adapter, write_model
from fedsoup.lora.checks import check_adapters, check_lora_options
from fedsoup.lora.into_base import base_producer, merge_into_base
from fedsoup.lora.measure import factor_product_errors
from fedsoup.lora.modes import LORA_MODES, merge_adapter_state_dicts, merge_adapters, merged_deltas
from fedsoup.lora.pairs import LORA_A_SUFFIX, LORA_B_SUFFIX, Adapter, LoraPair, dense_deltas, join_adapter, split_adapter
from fedsoup.lora.report import AdapterMerge, LoraReport

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "LORA_A_SUFFIX",
    "LORA_B_SUFFIX",
    "LORA_MODES",
    "Adapter",
    "AdapterMerge",
    "LoraPair",
    "LoraReport",
    "LoraSettings",
    "base_producer",
    "check_adapters",
    "check_lora_options",
    "dense_deltas",
    "factor_product_errors",
    "load_adapter",
    "read_adapter",
    "write_adapter",
    "write_model",
    "stream_model",
    "join_adapter",
    "merge_adapter_state_dicts",
    "merge_adapters",
    "merge_into_base",
    "merged_deltas",
    "parse_adapter_config",
    "split_adapter",
]
