"""zinbgrad: ZINB-WaVE fitted by batched second-order and stochastic optimization in PyTorch."""

__version__ = "0.1.0"
