"""zinbgrad: ZINB-WaVE fitted by batched second-order and stochastic optimization in PyTorch.

>>> import zinbgrad
>>> model = zinbgrad.ZINBWaVE(n_components=10).fit(adata)      # doctest: +SKIP
>>> zinbgrad.tl.zinbwave(adata, n_components=10)              # doctest: +SKIP
"""

__version__ = "0.1.0"

from . import datasets, tl
from .estimator import ZINBWaVE

__all__ = ["ZINBWaVE", "datasets", "tl", "__version__"]
