"""GPTQ: Hessian-aware rounding of a linear weight into the canonical quantized layout.

Round-to-nearest (``codegen.quant.quantize_weight``) rounds every weight on its own and so minimizes
``‖Wq − W‖²``. GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers") minimizes the layer's output error ``‖X Wqᵀ − X Wᵀ‖²``
over calibration inputs ``X`` instead: it quantizes one input column at a time and moves each
column's rounding error onto the columns not yet quantized, through the inverse of the input
Hessian ``H = XᵀX``. The result is an ordinary ``QuantizedWeight`` whose scales and zero points
follow the ``codegen.quant.compute_qparams`` rule, so the artifact format and every kernel read it
unchanged; only the integer codes differ from RTN's.
"""
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from qcompiler.codegen.act_quant import FP8_DTYPE, FP8_MAX, absmax_scale
from qcompiler.codegen.quant import QuantizedWeight, compute_qparams, pack_int4, qrange

from .rounding import search_qparams

_SUB_BLOCK = 16  # columns whose errors are applied one by one (see the NOTE in gptq_quantize)


class GPTQResult(NamedTuple):
    """``weight``: the canonical layout, as ``quantize_weight`` returns it.

    ``loss``: the error GPTQ tracks, ``Σ_rows ½ δ (H + λI) δᵀ`` with ``δ = Wq − W`` (dead input
    channels of ``W`` zeroed), ``H`` the Hessian passed in and ``λ`` the damping actually used.
    With ``H = 2 XᵀX`` that is ``‖X Wqᵀ − X Wᵀ‖²`` plus the damping term; with ``H = XᵀX``, half of it.
    """
    weight: QuantizedWeight
    loss: float


def _inverse_hessian_factor(H: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``Uᵀ U = (H + λI)⁻¹``), ``λ = damp · mean(diag H)``.

    ``U[j, j:] / U[j, j]`` is the optimal update of the columns after ``j`` per unit error in
    column ``j`` once columns ``< j`` are fixed, and ``U[j, j]²`` the matching inverse-Hessian
    diagonal: the Cholesky factor holds every step's row at once. If a factorization fails
    (an ill-conditioned ``H`` in float32), the damping is raised tenfold, up to three times."""
    mean_diag = H.diagonal().mean()
    frac = damp
    for _ in range(4):
        Hd = H.clone()
        Hd.diagonal().add_(frac * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0:
                return U
        frac = max(frac, 1e-4) * 10
    raise RuntimeError(f"GPTQ: the Hessian ({H.shape[0]}x{H.shape[0]}) is not positive definite even with "
                       f"damping {frac / 10:g} x mean(diag H); is it a sum of xᵀx?")


def _as_stored(scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``scale`` rounded to the dtype it is stored in, back in float32.

    NOTE: GPTQ must propagate the error of the weight the kernels will actually see, so it
    quantizes with the stored (e.g. bf16-rounded) scale; only a scale that rounds to 0 keeps
    its float32 value (its group is all zeros, whose codes dequantize to 0 either way)."""
    stored = scale.to(dtype).float()
    return torch.where(stored > 0, stored, scale)


@torch.no_grad()
def gptq_quantize(w: Tensor, hessian: Tensor, bits: int, group_size: Optional[int], symmetric: bool, *,
                  act_order: bool = False, clip: bool = False, fp8: bool = False, damp: float = 0.01,
                  block_size: int = 128) -> GPTQResult:
    """GPTQ-quantize a linear weight ``w [N, K]`` given its input Hessian ``hessian [K, K]``.

    ``hessian`` is ``Σ xᵀx`` over calibration tokens (any positive multiple: the codes do not
    depend on its scale). ``group_size=None`` means per-channel; ``bits``, ``group_size`` and
    ``symmetric`` mean what they mean for ``quantize_weight``.

    * Dead input channels (``H[i, i] == 0``) get ``H[i, i] = 1`` and ``W[:, i] = 0``.
    * Per-group qparams (no ``act_order``) come from the error-updated weights when a group's
      first column is reached, as in the reference implementations; per-channel qparams come
      from the original ``W`` (with its dead channels zeroed, so they cannot widen the grid).
    * ``act_order`` processes columns by decreasing ``diag(H)`` with static groups: every
      group's qparams are computed up front from the original ``W`` in natural column order,
      so the layout stays the canonical ``scales [N, K // G]`` (no ``g_idx``).
    * ``clip``: each group's range is the one ``rounding.search_qparams`` picks with this Hessian
      (its output error), not the group's min-max.
    * ``fp8``: the grid is float8 e4m3 with one scale per output channel (``absmax / 448``, as
      ``codegen.act_quant.quantize_weight_fp8``); the result's ``qweight`` is float8_e4m3fn ``[N, K]``,
      its ``scales`` float32 ``[N, 1]`` (``bits``, ``group_size`` and ``symmetric`` must be 8, None, True).
    * Columns are updated lazily in blocks of ``block_size`` (whole groups for dynamic groups).
    """
    assert bits in (4, 8), f"bits must be 4 or 8, got {bits}"
    assert not fp8 or (bits == 8 and group_size is None and symmetric and not clip), \
        "fp8 GPTQ is per-channel and symmetric, without a range search"
    N, K = w.shape
    assert hessian.shape == (K, K), f"hessian must be [K, K] = [{K}, {K}], got {tuple(hessian.shape)}"
    G = group_size or K
    assert K % G == 0, f"group_size {G} does not divide K={K}"
    assert block_size > 0, f"block_size must be positive, got {block_size}"
    qmin, qmax = qrange(bits)
    W = w.detach().float().clone()                                # [N, K]
    H = hessian.detach().float().clone()                          # [K, K]
    assert torch.isfinite(H).all(), "hessian has non-finite entries"
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0.0

    ngroups = K // G
    dynamic = group_size is not None and not act_order
    scales = torch.empty(ngroups, N)                              # [K // G, N], the stored values in float32
    zeros = None if symmetric else torch.zeros(ngroups, N)        # [K // G, N], integers in float32

    def qparams(cols: Tensor, h: Tensor):
        return search_qparams(cols, bits, G, symmetric, h) if clip else compute_qparams(cols, bits, G, symmetric)

    if fp8:
        scales.copy_(absmax_scale(W, FP8_MAX).t())               # float32, stored as it is
    elif not dynamic:
        s, z = qparams(W, H)                                      # [N, K // G]
        scales.copy_(_as_stored(s, w.dtype).t())
        if zeros is not None:
            zeros.copy_(z.t())

    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True)       # [K]: processing position -> column
        W, H = W[:, perm], H[perm][:, perm]
        group_of = (perm // G).tolist()
    else:
        perm, group_of = None, [c // G for c in range(K)]
    U = _inverse_hessian_factor(H, damp)                          # [K, K] upper triangular
    inv_d = (1.0 / U.diagonal()).tolist()

    # Lazy updates on two levels: column c's error reaches only the rest of its sub-block of
    # `sub` columns right away, the rest of its block of B columns after each sub-block
    # (one small matmul) and the columns after the block after each block (one larger one).
    # NOTE: dynamic groups need every column of a group fully error-updated when the group's
    # qparams are taken (the references read the lazily updated W there, missing the current
    # block's updates): blocks are whole numbers of groups and groups start on sub-blocks.
    # NOTE: the per-column updates stay under ATen's parallel grain (16 x N < 32768 elements for
    # N < 2048), so the ~10 K small ops run on one thread: a parallel region per column stalls
    # for whole time slices whenever another process shares the cores.
    B = G * max(1, block_size // G) if dynamic else block_size
    sub = math.gcd(G, _SUB_BLOCK) if dynamic else _SUB_BLOCK
    Wt = W.t().contiguous()                                       # [K, N]: a column is a contiguous row
    Qt = torch.empty(K, N)                                        # [K, N] codes, processing order
    Et = torch.empty(K, N)                                        # [K, N] scaled errors (x - dq) / U[c, c]
    for b0 in range(0, K, B):
        b1 = min(b0 + B, K)
        for s0 in range(b0, b1, sub):
            s1 = min(s0 + sub, b1)
            for c in range(s0, s1):
                g = group_of[c]
                if dynamic and c % G == 0:
                    s, z = qparams(Wt[c:c + G].t(), H[c:c + G, c:c + G])   # [N, 1]
                    scales[g] = _as_stored(s[:, 0], w.dtype)
                    if zeros is not None:
                        zeros[g] = z[:, 0]
                x, s, q, e = Wt[c], scales[g], Qt[c], Et[c]
                if fp8:  # the nearest e4m3 value (the cast rounds to nearest even)
                    torch.div(x, s, out=q).clamp_(-FP8_MAX, FP8_MAX)
                    q.copy_(q.to(FP8_DTYPE))
                    torch.mul(q, s, out=e)
                elif zeros is None:
                    torch.div(x, s, out=q).round_().clamp_(qmin, qmax)
                    torch.mul(q, s, out=e)
                else:
                    torch.div(x, s, out=q).round_().add_(zeros[g]).clamp_(qmin, qmax)
                    torch.sub(q, zeros[g], out=e).mul_(s)
                torch.sub(x, e, out=e).mul_(inv_d[c])
                Wt[c + 1:s1].addr_(U[c, c + 1:s1], e, alpha=-1.0)
            Wt[s1:b1].addmm_(U[s0:s1, s1:b1].t(), Et[s0:s1], alpha=-1.0)   # [b1 - s1, sub] @ [sub, N]
        Wt[b1:].addmm_(U[b0:b1, b1:].t(), Et[b0:b1], alpha=-1.0)           # [K - b1, B] @ [B, N]
    loss = float(Et.square().sum()) / 2

    Q = Qt.t()                                                    # [N, K], processing order
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    if fp8:
        return GPTQResult(QuantizedWeight(Q.to(FP8_DTYPE).contiguous(), scales.t().contiguous(), None), loss)
    q = Q.to(torch.int8).contiguous()
    qweight = pack_int4(q) if bits == 4 else q
    out_zeros = None if zeros is None else zeros.t().to(torch.int8).contiguous()
    return GPTQResult(QuantizedWeight(qweight, scales.t().to(w.dtype).contiguous(), out_zeros), loss)
