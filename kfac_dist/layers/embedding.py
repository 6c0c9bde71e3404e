"""Curvature of ``nn.Embedding``: the input row is a one-hot vector, so A is diagonal (token frequencies).

In Linear terms an embedding computes ``s = E^T onehot(i)``, so its gradient matrix is ``dE^T`` of shape
``(embedding_dim, num_embeddings)`` and ``A = diag(counts / rows)``, stored as its diagonal.
"""

from __future__ import annotations

import torch
from torch import nn

from kfac_dist.layers.base import KFACLayer, copy_grad


class EmbeddingLayer(KFACLayer):
    """K-FAC factors of an embedding lookup (dense gradients only)."""

    module: nn.Embedding
    a_diagonal = True

    @property
    def has_bias(self) -> bool:
        """Embeddings have no bias."""
        return False

    @property
    def blocks(self) -> int:
        """An embedding is one block."""
        return 1

    @property
    def a_side(self) -> int:
        """Vocabulary size."""
        return self.module.num_embeddings

    @property
    def g_side(self) -> int:
        """Embedding dimension."""
        return self.module.embedding_dim

    def input_rows(self, inputs: torch.Tensor) -> torch.Tensor:
        """Not materialised: one-hot rows are summarised by their counts (see ``a_contribution``)."""
        raise TypeError("embedding input rows are one-hot; use a_contribution")

    def a_contribution(
        self, inputs: torch.Tensor, dtype: torch.dtype, precision: str = "highest"
    ) -> tuple[torch.Tensor, int]:
        """Token counts (the diagonal of sum_rows a a^T) and the number of rows."""
        indices = inputs.reshape(-1)
        counts = torch.bincount(indices, minlength=self.module.num_embeddings).to(dtype)
        return counts.unsqueeze(0), indices.numel()

    def output_rows(self, grad_output: torch.Tensor) -> torch.Tensor:
        """Every looked-up index is a row."""
        return grad_output.reshape(1, -1, self.module.embedding_dim)

    def grad_matrix(self) -> torch.Tensor:
        """``dE^T`` as a ``(1, dim, vocabulary)`` matrix."""
        weight_grad = self.module.weight.grad
        assert weight_grad is not None
        return weight_grad.t().unsqueeze(0)

    def set_grad_matrix(self, matrix: torch.Tensor) -> None:
        """Write ``dE = matrix^T`` back."""
        copy_grad(self.module.weight, matrix[0].t())
