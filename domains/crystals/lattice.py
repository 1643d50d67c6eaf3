"""The lattice representation diffused by the crystal domain: the matrix logarithm of the cell's stretch.

A lattice matrix L (rows: the lattice vectors, Angstrom) factors as L = S U with S = (L L^T)^(1/2)
symmetric positive definite and U orthogonal (the polar decomposition). Rotating a crystal maps L to
L R, which leaves S unchanged: S carries the lattice's shape and size and nothing of its orientation.
The diffused field is log S, a symmetric matrix, as its 6 upper-triangle entries (standardized per
entry with the training set's mean and spread), on an affine Gaussian path.

Why this choice over the alternatives the issue names:
- lengths and angles (CDVAE): a Gaussian over 6 free numbers reaches angle triples that no cell has
  (alpha > beta + gamma), and a noisy length can go negative; every point of the log S space is a
  cell, since exp of any symmetric matrix is symmetric positive definite, with volume exp(tr log S) > 0;
- DiffCSP's lattice matrix: 9 numbers of which 3 are orientation, which the data does not fix, so the
  network must be O(3)-equivariant in L to learn it well; log S has only the 6 invariant ones, and
  any network that reads them is invariant (S S^T = L L^T are the inner products CSPNet feeds).
The map back is L = exp(log S), a symmetric cell (U = I); every orientation is equally valid.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

UPPER = (torch.tensor([0, 1, 2, 0, 0, 1]), torch.tensor([0, 1, 2, 1, 2, 2]))  # diagonal, then off-diagonal


def log_stretch(matrices: np.ndarray) -> np.ndarray:
    """Lattice matrices [N, 3, 3] (rows: vectors) as the 6 upper entries of log S, [N, 6]."""
    metric = matrices @ np.swapaxes(matrices, 1, 2)  # L L^T = S^2
    values, vectors = np.linalg.eigh(metric)
    if (values <= 1e-12 * values.max(axis=-1, keepdims=True)).any():  # rounding leaves a flat cell a tiny eigenvalue
        raise ValueError("a lattice matrix is singular (zero volume): it has no log stretch")
    log_s = vectors @ (0.5 * np.log(values)[..., None] * np.swapaxes(vectors, 1, 2))
    return log_s[:, UPPER[0].numpy(), UPPER[1].numpy()]


def stretch_matrix(entries: Tensor) -> Tensor:
    """The 6 upper entries of log S [B, 6] as lattice matrices exp(log S) [B, 3, 3] (symmetric)."""
    log_s = torch.zeros(*entries.shape[:-1], 3, 3, dtype=torch.float64, device=entries.device)
    log_s[..., UPPER[0], UPPER[1]] = entries.double()
    log_s[..., UPPER[1], UPPER[0]] = entries.double()
    return torch.linalg.matrix_exp(log_s)
