"""zinbgrad: ZINB-WaVE fitted by batched second-order and stochastic optimization in PyTorch.

>>> import zinbgrad
>>> model = zinbgrad.ZINBWaVE(n_components=10).fit(adata)      # doctest: +SKIP
>>> zinbgrad.tl.zinbwave(adata, n_components=10)              # doctest: +SKIP
"""

__version__ = "0.1.0"

# before anything imports torch: idle OpenMP threads sleep instead of spinning (see .openmp)
from .openmp import prefer_passive_wait

prefer_passive_wait()

from . import datasets, pl, pp, tl  # noqa: E402
from .estimator import ZINBWaVE  # noqa: E402

__all__ = ["ZINBWaVE", "datasets", "pl", "pp", "tl", "__version__"]
