"""Offline merging of checkpoint files (``fedsoup merge`` / ``fedsoup inspect`` as library calls).

- :mod:`~fedsoup.offline.driver`: :func:`merge_files`, the whole file merge in one call.
- :mod:`~fedsoup.offline.producers`: in-memory and tensor-by-tensor merging, the choice between them.
- :mod:`~fedsoup.offline.tables`: config and metrics files.
- :mod:`~fedsoup.offline.inspect`: :func:`inspect_files`.
"""

from fedsoup.offline.driver import DEFAULT_SHARD_SIZE, MergeReport, merge_files, run_merge_files
from fedsoup.offline.inspect import inspect_files
from fedsoup.offline.tables import load_config, load_metrics

__all__ = ["merge_files", "run_merge_files", "MergeReport", "inspect_files", "load_config", "load_metrics",
           "DEFAULT_SHARD_SIZE"]
