"""FedSoup: weight-space model merging by Amortized Model Ensembling (AME).

``fedsoup.merge`` runs a ``torch.optim`` optimizer over the pseudogradients
``w - x_i`` of a set of models (paper: "On Defining Neural Averaging", Algorithm 1);
with the defaults it returns the plain weighted soup ``fedsoup.soup``.
``fedsoup.merge_files`` does the same on checkpoint files (``fedsoup merge`` on the
command line). A merge goes options → plan → kernels → report: options are one type,
validated once (``fedsoup.MergeOptions``); ``merge(..., report=True)`` also returns what
the merge did (``fedsoup.MergeReport``); errors are typed and carry their culprit as
attributes (``fedsoup.MergeInputError``).
"""

from fedsoup.ame import merge, soup
from fedsoup.errors import (
    CheckpointError,
    MergeInputError,
    MergeWarning,
    OptionError,
    OutputError,
    OutputExistsError,
    StateError,
    UnknownOptionError,
)
from fedsoup.inputs import find_non_finite  # noqa: F401 - internal helper, used by strategies/
from fedsoup.offline import inspect_files, merge_files
from fedsoup.optim import (  # noqa: F401 - is_plain_sgd, make_optimizer: internal helpers, used by strategies/
    OPTIMIZERS,
    FedAdagrad,
    FedAdam,
    FedYogi,
    is_elementwise,
    is_plain_sgd,
    make_optimizer,
    resolve_optimizer,
)
from fedsoup.options import MergeOptions, OptimizerOptions
from fedsoup.report import MergeReport
from fedsoup.schedules import make_schedule  # noqa: F401 - internal helper

__all__ = [
    "merge",
    "soup",
    "merge_files",
    "inspect_files",
    "MergeOptions",
    "OptimizerOptions",
    "MergeReport",
    "MergeInputError",
    "OptionError",
    "UnknownOptionError",
    "OutputExistsError",
    "StateError",
    "CheckpointError",
    "OutputError",
    "MergeWarning",
    "OPTIMIZERS",
    "FedAdam",
    "FedYogi",
    "FedAdagrad",
    "resolve_optimizer",
    "is_elementwise",
]
__version__ = "0.1.0"
