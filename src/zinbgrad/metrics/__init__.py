"""Evaluation metrics of the scVI benchmark (Lopez et al., Nature Methods 2018).

The definitions follow the scVI reference code (``scvi/inference/posterior.py``
and ``scvi/dataset/dataset.py`` of the scVI / scvi-tools repository, 2018-2019):

clustering_scores
    K-means on the latent space with k = number of true labels; ARI, NMI
    (``sqrt(H(P) H(T))`` normalisation, as stated in the paper) and the
    average silhouette width of the latent space on the true labels.
batch_mixing_entropy
    Entropy of batch mixing: regional Shannon entropies (natural log) of the
    batch frequencies among the 50 nearest neighbours (the cell itself
    excluded) of random cells, averaged within and then across pools.
corrupt_counts / imputation_error
    The imputation benchmark: zero out a uniformly chosen fraction of the
    non-zero entries and report the median absolute error on them.
binomial_thinning_batch
    A semi-synthetic two-batch data set made by binomial thinning.
molecular_split / mcv_loss / mcv_zinbwave
    Denoising scored by molecular cross-validation (Batson, Royer & Webber 2019; the Open
    Problems denoising task): Poisson loss and MSE of log1p-normalized counts.
"""

from ._counts import CorruptedCounts, binomial_thinning_batch, corrupt_counts, imputation_error
from ._latent import batch_mixing_entropy, clustering_scores
from ._mcv import mcv_loss, mcv_zinbwave, molecular_split

__all__ = [
    "clustering_scores",
    "batch_mixing_entropy",
    "CorruptedCounts",
    "corrupt_counts",
    "imputation_error",
    "binomial_thinning_batch",
    "molecular_split",
    "mcv_loss",
    "mcv_zinbwave",
]
