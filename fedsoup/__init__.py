"""FedSoup: weight-space model merging by Amortized Model Ensembling (AME).

``fedsoup.merge`` runs a ``torch.optim`` optimizer over the pseudogradients
``w - x_i`` of a set of models (paper: "On Defining Neural Averaging", Algorithm 1);
with the defaults it returns the plain weighted soup ``fedsoup.soup``.
"""

from fedsoup.ame import find_non_finite, merge, soup
from fedsoup.optim import (
    OPTIMIZERS,
    FedAdagrad,
    FedAdam,
    FedYogi,
    is_elementwise,
    is_plain_sgd,
    make_optimizer,
    resolve_optimizer,
)
from fedsoup.schedules import make_schedule

__all__ = [
    "merge",
    "soup",
    "find_non_finite",
    "OPTIMIZERS",
    "FedAdam",
    "FedYogi",
    "FedAdagrad",
    "resolve_optimizer",
    "is_elementwise",
    "is_plain_sgd",
    "make_optimizer",
    "make_schedule",
]
__version__ = "0.1.0"
