"""Scanpy-style tools: functions that take an AnnData and write their results into it."""

from ..de import differential_expression
from ._interpret import latent_uncertainty, loadings, select_n_components, top_genes
from ._outputs import (
    batch_corrected,
    impute,
    normalize,
    observational_weights,
    project,
    residuals,
)
from ._zinbwave import model_from_anndata, zinbwave

__all__ = [
    "batch_corrected",
    "differential_expression",
    "impute",
    "latent_uncertainty",
    "loadings",
    "model_from_anndata",
    "normalize",
    "observational_weights",
    "project",
    "residuals",
    "select_n_components",
    "top_genes",
    "zinbwave",
]
