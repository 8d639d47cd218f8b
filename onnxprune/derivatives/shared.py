"""Layers whose weight is shared across positions: Conv geometry, im2col, and their ECP sums.

A Conv (or a MatMul on a 3-D input) applies the same weight at every position t of a sample. In the
(out, in) view a row i of a Conv weight is ``W[i].reshape(-1)`` (in = C/groups * prod(kernel)) and
the value it multiplies at position t is the im2col patch z_t (the input window, zero padding
included). Per sample s and probe (output) k, with g_kti = dy_k/da_ti:

    dy_k/dW_ij = u_kij = sum_t g_kti z_tj        dy_k/db_i = v_ki = sum_t g_kti

so ECP's statistics become A_ij = E[sum_k u_kij^2], B_ij = E[sum_k u_kij v_ki], C_i = E[sum_k v_ki^2]
("exact": K Jacobian rows per sample, as for a 2-D layer, plus one (O x T) @ (T x J) product per row).
With one position (a 2-D layer) they reduce to E[G z^2], E[G z], E[G].

The cheaper "positions" approximation treats every (sample, position) pair as a sample of its own:
G_ti = sum_k g_kti^2, A_ij = E[sum_t G_ti z_tj^2], B_ij = E[sum_t G_ti z_tj], C_i = E[sum_t G_ti],
i.e. the exact sums without the cross terms between different positions (t != t'). It keeps the
sum over positions (not the mean) so that its scores stay on the same scale as the exact ones and
as those of 2-D layers in a global ranking.
"""
from __future__ import annotations

import numpy as np

STATISTICS = ("exact", "positions")


CHUNK_ELEMENTS = 1 << 22  # bound on the float64 temporaries of one accumulation step (32 MB)


def accumulate_shared(sums, g: np.ndarray, patches: np.ndarray, scale: float, exact: bool) -> None:
    """Add one batch to ``sums`` (LayerStatistics' sum_g, sum_gz, sum_gz2).

    g: (n, r, out, T) derivatives of the protected output's r probes at every position;
    patches: (n, groups, J, T) the values each row's weights multiply; scale: 1 for exact
    Jacobian rows, 1/r for random probes. Products are taken in the patches' float type (float32
    for a float32 model: BLAS's sgemm, half the bytes) and each block's sums are added to the float64
    totals. Every sum is linear over samples, probes and rows, so they are taken in blocks of
    (samples, probes, rows) whose temporaries (u is (probes, rows, J) per sample: 600 MB in float64
    for one sample of a 512-channel 3x3 Conv with 32 probes) stay under CHUNK_ELEMENTS each.
    """
    n, r, out, positions = g.shape
    groups, per = patches.shape[1], out // patches.shape[1]
    dtype = np.float32 if patches.dtype == np.float32 else np.float64
    unit = max(positions, patches.shape[2])  # elements per (sample, probe, row) of the largest temporary
    row_step = min(per, max(1, CHUNK_ELEMENTS // unit))
    probe_step = min(r, max(1, CHUNK_ELEMENTS // (unit * row_step)))
    sample_step = max(1, CHUNK_ELEMENTS // (unit * row_step * probe_step))
    for start in range(0, n, sample_step):
        samples = slice(start, start + sample_step)
        zs = np.asarray(patches[samples], dtype)
        for group in range(groups):
            zt = np.ascontiguousarray(zs[:, group].transpose(0, 2, 1))                # (n, T, J)
            for first in range(group * per, (group + 1) * per, row_step):
                rows = slice(first, min(first + row_step, (group + 1) * per))
                for probe in range(0, r, probe_step):
                    gg = np.asarray(g[samples, probe:probe + probe_step, rows], dtype)  # (n, r, rows, T)
                    _add_block(sums, rows, gg, zt, scale, exact)


def _add_block(sums, rows: slice, gg: np.ndarray, zt: np.ndarray, scale: float, exact: bool) -> None:
    """One block of ``accumulate_shared``: gg (n, r, rows, T), zt (n, T, J), in one float type."""
    if exact:
        u = np.matmul(gg, zt[:, None])                                    # (n, r, rows, J)
        v = gg.sum(-1)                                                    # (n, r, rows)
        sums.sum_gz2[rows] += scale * np.einsum("nrij,nrij->ij", u, u)
        sums.sum_gz[rows] += scale * np.einsum("nrij,nri->ij", u, v)
        sums.sum_g[rows] += scale * np.einsum("nri,nri->i", v, v)
        if getattr(sums, "sum_g_positions", None) is not None:
            sums.sum_g_positions[rows] += scale * (gg * gg).sum((0, 1, 3))
    else:
        big_g = (gg * gg).sum(1) * gg.dtype.type(scale)                   # (n, rows, T)
        sums.sum_gz2[rows] += np.matmul(big_g, zt * zt).sum(0)
        sums.sum_gz[rows] += np.matmul(big_g, zt).sum(0)
        sums.sum_g[rows] += big_g.sum((0, 2))
        if getattr(sums, "sum_g_positions", None) is not None:
            sums.sum_g_positions[rows] += big_g.sum((0, 2))


def shared_loss_gradient(g: np.ndarray, patches: np.ndarray) -> np.ndarray:
    """sum over samples of dL/dW in the (out, in) view: g (n, out, T) loss derivatives at the
    pre-activation, patches (n, groups, J, T)."""
    n, out, positions = g.shape
    groups, per = patches.shape[1], out // patches.shape[1]
    total = np.zeros((out, patches.shape[2]))
    for group in range(groups):
        rows = slice(group * per, (group + 1) * per)
        total[rows] = np.einsum("not,njt->oj", np.asarray(g[:, rows], np.float64), np.asarray(patches[:, group], np.float64))
    return total
