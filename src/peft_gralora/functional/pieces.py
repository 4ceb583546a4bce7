"""Layout surgery for hotswap and ``cat``: cut an adapter into pieces, assemble pieces into another layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layouts import export_lora_factors
from .shapes import gralora_shape

# ---------------------------------------------------------------------------------------------------------------------
# Layout surgery: moving an adapter exactly into another GraLoRA (or plain LoRA) layout
#
# A plain LoRA adapter of rank p is the layout (k=1, hybrid_r=0). Two facts make every move below exact:
# - a grid of k' blocks fits a finer grid of k = q k' blocks: fine block (I, J) lies inside coarse block
#   (I // q, J // q), so fine row I of A is coarse row I // q (all columns) and fine column J of B is coarse column
#   J // q (all rows): a ``repeat_interleave`` by q along the block index;
# - a plain LoRA ``B_p A_p`` of rank p is the k = 1 case: in a grid of k blocks it takes sub-block rank p.
# Zero rows of A / columns of B contribute nothing, so unused room anywhere is padding.
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class GraloraPieces:
    """An adapter cut into parts that each fit a GraLoRA layout of ``k`` blocks; the sum of their deltas is its delta.

    Attributes:
        k: the block count of the grid pieces.
        grid: ``(A3, B3)`` pairs, ``A3 (k, s_p, in)`` (output block i, sub-rank t, input features) and
            ``B3 (out, k, s_p)`` (output features, input block j, sub-rank t); block ``(i, j)`` of the piece's delta
            is ``B3[rows_i, j] @ A3[i, :, cols_j]``.
        plain: plain LoRA pairs ``(A (p, in), B (out, p))``, delta ``B @ A``.
    """

    k: int
    grid: list[tuple[torch.Tensor, torch.Tensor]]
    plain: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def grid_rank(self) -> int:
        """Sub-block rank the grid pieces need, side by side."""
        return sum(a3.shape[1] for a3, _ in self.grid)

    @property
    def plain_rank(self) -> int:
        """Total rank of the plain pieces."""
        return sum(a.shape[0] for a, _ in self.plain)


def gralora_pieces(
    weight_A: torch.Tensor, weight_B: torch.Tensor, k: int, hybrid_r: int, target_k: int, embed: bool = True
) -> GraloraPieces:
    """Cut an adapter (GraLoRA ``(k, hybrid_r)``; plain LoRA is ``k=1, hybrid_r=0``) into pieces for ``target_k``.

    - the hybrid branch, and a ``k == 1`` grid, are plain pieces;
    - a grid with ``k == target_k`` is one grid piece (a view of the factors);
    - a grid with ``k`` dividing ``target_k`` is one grid piece of the same sub-block rank when ``embed``;
    - a grid with ``target_k`` dividing ``k = q * target_k`` is one grid piece of sub-block rank ``q^2 s`` when
      ``embed`` (each coarse block holds ``q x q`` fine blocks of rank ``s``);
    - any other grid becomes a plain piece of rank ``k * g`` through the exact :func:`export_lora_factors`.

    Args:
        weight_A: ``(r, in)``.
        weight_B: ``(out, r)``.

    Raises:
        ValueError: if the factors are not a valid ``(k, hybrid_r)`` adapter, or the features are not divisible by
            ``target_k``.
    """
    shp = gralora_shape(weight_A, weight_B, k, hybrid_r)
    if target_k < 1 or shp.in_features % target_k or shp.out_features % target_k:
        raise ValueError(
            f"gralora_k={target_k} does not divide in_features={shp.in_features} and out_features={shp.out_features}."
        )
    g, s = shp.g, shp.s
    pieces = GraloraPieces(target_k, [], [])
    if k == 1:
        pieces.plain.append((weight_A[:g], weight_B[:, :g]))
    elif target_k % k == 0 and (embed or k == target_k):
        q = target_k // k
        a3 = weight_A[:g].reshape(k, s, shp.in_features)  # (i, t, in): rows (i, t) of the grid
        b3 = weight_B[:, :g].reshape(shp.out_features, k, s)  # (out, j, t): columns (j, t) of the grid
        if q > 1:  # fine block I lies in coarse block I // q
            a3, b3 = a3.repeat_interleave(q, dim=0), b3.repeat_interleave(q, dim=1)
        pieces.grid.append((a3, b3))
    elif embed and k % target_k == 0:
        pieces.grid.append(_coarsened(weight_A[:g], weight_B[:, :g], k, k // target_k))
    else:
        a_plain, b_plain = export_lora_factors(weight_A[:g], weight_B[:, :g], k, 0)  # (k g, in), (out, k g)
        pieces.plain.append((a_plain, b_plain))
    if hybrid_r:
        pieces.plain.append((weight_A[g:], weight_B[:, g:]))
    return pieces


def _coarsened(a_grid: torch.Tensor, b_grid: torch.Tensor, k: int, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A grid of ``k = q * kc`` blocks as one grid piece of ``kc`` blocks and sub-block rank ``q^2 s``.

    Sub-ranks ``(a, b, t)``: fine block ``(q I + a, q J + b)`` of coarse block ``(I, J)``, its sub-rank ``t``. Row
    ``(I, (a, b, t))`` of the piece's ``A`` is row ``t`` of ``A_{qI+a, j}`` on the fine column blocks ``j = b (mod
    q)``, zero elsewhere; column ``(J, (a, b, t))`` of its ``B`` is column ``t`` of ``B_{i, qJ+b}`` on the fine row
    blocks ``i = a (mod q)``, zero elsewhere.

    Args:
        a_grid: ``(g, in)``, rows ``(i, t)``.
        b_grid: ``(out, g)``, columns ``(j, t)``.

    Returns:
        ``A3 (kc, q*q*s, in)`` and ``B3 (out, kc, q*q*s)``.
    """
    g, in_features = a_grid.shape
    out_features = b_grid.shape[0]
    kc, s = k // q, g // k
    a4 = a_grid.reshape(kc, q, s, kc, q, in_features // k)  # (I, a, t, J', b', c): fine i = qI+a, j = qJ'+b'
    b4 = b_grid.reshape(kc, q, out_features // k, kc, q, s)  # (I', a', row, J, b, t): fine i = qI'+a', j = qJ+b
    eye = torch.eye(q, dtype=a_grid.dtype, device=a_grid.device)
    # A3[I, a, b, t, J', b', c] = a4[I, a, t, J', b', c] * [b' == b]
    a3 = torch.einsum("iatjyc,by->iabtjyc", a4, eye).reshape(kc, q * q * s, in_features)
    # B3[I', a', row, J, a, b, t] = b4[I', a', row, J, b, t] * [a' == a]
    b3 = torch.einsum("ixrjbt,xa->ixrjabt", b4, eye).reshape(out_features, kc, q * q * s)
    return a3, b3


def gralora_assemble(
    pieces: list[GraloraPieces],
    target_r: int,
    target_hybrid_r: int,
    in_features: int,
    out_features: int,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write pieces side by side into one adapter of layout ``(r=target_r, k, hybrid_r=target_hybrid_r)``.

    Grid pieces take consecutive sub-ranks of every block, in order; plain pieces fill the hybrid branch in order and,
    once it is full, continue in the grid (sub-block rank ``p`` for rank ``p``). Whatever is left is zero. Checked
    before anything is allocated.

    Args:
        pieces: all cut for the same ``k`` (:func:`gralora_pieces`), factors of one dtype.
        dtype: of the result; defaults to the first factor's.

    Returns:
        ``weight_A (target_r, in)`` and ``weight_B (out, target_r)`` with delta the sum of the pieces' deltas.

    Raises:
        ValueError: when the pieces do not fit, naming the room needed and the room there is.
    """
    k = pieces[0].k
    if any(p.k != k for p in pieces):
        raise ValueError(f"gralora_assemble: pieces cut for different k: {[p.k for p in pieces]}.")
    g = target_r - target_hybrid_r
    if not 0 <= target_hybrid_r < target_r or g % k:
        raise ValueError(f"Invalid target layout r={target_r}, gralora_k={k}, hybrid_r={target_hybrid_r}.")
    s = g // k
    grid_need = sum(p.grid_rank for p in pieces)
    plain_need = sum(p.plain_rank for p in pieces)
    overflow = max(0, plain_need - target_hybrid_r)
    if grid_need + overflow > s:
        raise ValueError(
            f"does not fit: it needs sub-block rank {grid_need} for its grid plus rank {plain_need} of plain LoRA "
            f"(hybrid), but the layout r={target_r}, gralora_k={k}, hybrid_r={target_hybrid_r} has sub-block rank "
            f"{s} and hybrid rank {target_hybrid_r} (plain rank beyond the hybrid costs sub-block rank one for one)."
        )
    first = pieces[0].grid[0][0] if pieces[0].grid else pieces[0].plain[0][0]
    dtype = dtype or first.dtype
    weight_A = torch.zeros(target_r, in_features, dtype=dtype, device=first.device)
    weight_B = torch.zeros(out_features, target_r, dtype=dtype, device=first.device)
    a3 = weight_A[:g].view(k, s, in_features)  # (i, t, in)
    b3 = weight_B[:, :g].view(out_features, k, s)  # (out, j, t)
    off = 0
    for piece in pieces:
        for pa, pb in piece.grid:
            width = pa.shape[1]
            a3[:, off : off + width] = pa
            b3[:, :, off : off + width] = pb
            off += width
    h_off = 0
    for piece in pieces:
        for pa, pb in piece.plain:
            take = min(pa.shape[0], target_hybrid_r - h_off)
            weight_A[g + h_off : g + h_off + take] = pa[:take]
            weight_B[:, g + h_off : g + h_off + take] = pb[:, :take]
            h_off += take
            rest = pa.shape[0] - take
            if rest:  # a plain LoRA in the grid: the same rows for every output block, columns for every input block
                a3[:, off : off + rest] = pa[take:]  # (rest, in) broadcast over i
                b3[:, :, off : off + rest] = pb[:, take:].unsqueeze(1)  # (out, 1, rest) broadcast over j
                off += rest
    return weight_A, weight_B


def gralora_fit_factors(
    weight_A: torch.Tensor,
    weight_B: torch.Tensor,
    k: int,
    hybrid_r: int,
    target_k: int,
    target_hybrid_r: int,
    target_r: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same adapter, exactly, in another layout: GraLoRA ``(k, hybrid_r)`` -> ``(target_r, target_k,
    target_hybrid_r)``; plain LoRA on either side is ``k=1, hybrid_r=0``.

    Used to pad an adapter to a larger rank (zero sub-ranks in every block, zero hybrid rows) and to move an adapter
    into a resident layout (hotswap). Tries the grid embedding first (refined when ``k`` divides ``target_k``,
    coarsened when ``target_k`` divides ``k``), then the plain export of the grid.

    Args:
        weight_A: ``(r, in)``.
        weight_B: ``(out, r)``.

    Returns:
        ``weight_A (target_r, in)``, ``weight_B (out, target_r)`` with the same delta as the input.

    Raises:
        ValueError: when the adapter cannot be represented in the target layout (too little room), saying why.
    """
    shp = gralora_shape(weight_A, weight_B, k, hybrid_r)
    error: ValueError | None = None
    for embed in (True, False):
        pieces = gralora_pieces(weight_A, weight_B, k, hybrid_r, target_k, embed=embed)
        try:
            return gralora_assemble([pieces], target_r, target_hybrid_r, shp.in_features, shp.out_features)
        except ValueError as exc:
            error = error or exc
        if k in (1, target_k) or (target_k % k and k % target_k):  # the second try would cut the same pieces
            break
    raise error
