"""Tiles for the weight-only GEMM: ``LinearConfig`` (tile sizes, split and kernel form), the
measured per-card tables (``codegen/tuned/<device>.json``, written by ``bench/gpu_tune.py``), and
``pick_config``, which prefers a measured entry and otherwise follows rules.
"""
import functools
import json
import os
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from .cuda import cdiv, num_sms, pow2_ceil, pow2_divisor, pow2_floor

GEMV_MAX_M = 4  # up to this many rows: the GEMV forms may run (no tensor cores)
SWAP_MIN_M = 3  # from this many rows the rules take the tensor-core form (2 for grouped int8)
TUNED_DIR = Path(__file__).parent / "tuned"
FORMS = ("planes", "stream", "words", "swap", "dequant")
DEQUANT_MIN_M = 512  # from here the rules dequantize the weight and call the float GEMM


class LinearConfig(NamedTuple):
    """Tiles of one call. ``form`` picks the kernel: ``planes`` (``_wq_linear_kernel``: for decode
    sizes a reduction along K per tile, else ``tl.dot`` on the two nibble planes), a weight stream
    for decode sizes (``stream``: ``_wq_gemv_stream_kernel``; ``words``: ``_w4_gemv_words_kernel``),
    the swapped tensor-core form (``swap``: ``_wq_dot_swap_kernel``, ``block_m >= 16``), or for
    prefill sizes the weight dequantized in ``x.dtype`` and the float GEMM (``dequant``: the
    dequantizing kernel takes ``block_n``, ``block_k`` and ``num_warps``). Entries of tables written
    before forms existed read as ``planes``."""
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    form: str = "planes"


@functools.lru_cache(maxsize=None)
def tuned_table(device_name: str) -> dict:
    """``{(bits, group, N, K): [(M, LinearConfig), ...] sorted by M}`` from
    ``codegen/tuned/<device name>.json`` (spaces as underscores); empty when there is none."""
    path = TUNED_DIR / (device_name.replace(" ", "_") + ".json")
    if not path.is_file():
        return {}
    table: dict = {}
    for e in json.loads(path.read_text())["entries"]:
        key = (e["bits"], e["group"], e["N"], e["K"])
        table.setdefault(key, []).append((e["M"], LinearConfig(**e["config"])))
    return {k: sorted(v) for k, v in table.items()}


def tuned_config(table: dict, M: int, N: int, K: int, group: int, bits: int) -> Optional[LinearConfig]:
    """The entry of ``table`` (as ``tuned_table`` returns) for this shape measured at the M nearest
    to ``M`` on the same side of ``GEMV_MAX_M`` (decode sizes, or larger), or None."""
    rows = table.get((bits, group, N, K))
    if not rows:
        return None
    same = [(m, c) for m, c in rows if (m <= GEMV_MAX_M) == (M <= GEMV_MAX_M)]
    if not same:
        return None
    cfg = min(same, key=lambda mc: (abs(mc[0] - M), mc[0]))[1]
    if M <= GEMV_MAX_M and cfg.block_m < 16:  # a GEMV tile's rows follow M (tensor-core tiles pad to 16)
        cfg = cfg._replace(block_m=pow2_ceil(M))
    return cfg


def _tuned(M: int, N: int, K: int, group: int, bits: int, device: torch.device) -> Optional[LinearConfig]:
    if device.type != "cuda" or os.environ.get("QCOMPILER_TUNED", "1") == "0":
        return None
    return tuned_config(tuned_table(torch.cuda.get_device_name(device)), M, N, K, group, bits)


@functools.lru_cache(maxsize=4096)  # one answer per shape and device: a call pays for a dict lookup only
def pick_config(M: int, N: int, K: int, group: int, bits: int, device: torch.device) -> LinearConfig:
    """Tiles for one call. A measured entry for this device and shape wins (``tuned_table``),
    except a ``dequant`` entry below ``DEQUANT_MIN_M // 2`` rows: at decode sizes (in CUDA graphs
    too) it would dequantize every weight per step. Otherwise, by rule:

    * from ``DEQUANT_MIN_M`` rows, ``dequant``: the weight dequantized once, then the float GEMM;
    * below ``SWAP_MIN_M`` rows (below 2 for grouped int8), the weight stream: ``words`` for int4
      (it falls back to ``stream`` for activations other than bf16), ``stream`` for int8;
    * otherwise ``swap``, the tensor-core form with rows padded to 16 and tiles growing with M.

    A tuned entry is taken only if its BLOCK_K divides the group. The rules' configs keep these:
    BLOCK_K is a power of two dividing the group size unless the scale is per channel (a K tile
    never straddles two groups); K is split only up to M = 64, each split at least four K tiles
    long, and the programs (tiles times splits) stay within ``max(tiles, 4 * num_sms)``. The
    rules' tiles are the ones with the fewest issue cycles per weight and no register spills
    in ``bench/kernel_sass.py``'s sm_90 count (``bench/RESULTS.md``); a table written by
    ``bench/gpu_tune.py`` overrides them."""
    per_channel = group >= K
    tuned = _tuned(M, N, K, group, bits, device)
    # a dequant entry answers only near prefill sizes: at decode sizes (in CUDA graphs too) it
    # would dequantize every weight per step
    if (tuned is not None and (per_channel or group % tuned.block_k == 0)
            and (tuned.form != "dequant" or M >= DEQUANT_MIN_M // 2)):
        return tuned
    if M >= DEQUANT_MIN_M:
        return LinearConfig(128, 64, 128 if per_channel else min(128, pow2_divisor(group)), 1, 4, 1, "dequant")
    gemv = M < (SWAP_MIN_M if bits == 4 or per_channel else 2)
    form = ("words" if bits == 4 else "stream") if gemv else "swap"
    if gemv:  # M <= 2
        bm, bn, bk, warps, stages = pow2_ceil(M), 128, 128 if bits == 4 else 64, 4, 1
    elif M <= 32:
        bm, bn, bk, warps, stages = max(16, pow2_ceil(M)), 64, 128, 4, 3
    elif M <= 64:
        bm, bn, bk, warps, stages = 64, 128, 128, 8, 3
    else:
        bm, bn, bk, warps, stages = 128, 128, 128, 8, 3
    if bits == 8 and gemv:
        bk //= 2  # one code per byte: the same 32 bytes per lane
    if not per_channel:
        bk = min(bk, pow2_divisor(group))
    k_tiles = cdiv(K, bk)
    tiles = cdiv(M, bm) * cdiv(N, bn)
    split = 1
    if M <= 64:
        want = max(1, 4 * num_sms(device) // tiles)
        split = min(pow2_floor(want), max(1, k_tiles // 4))
    return LinearConfig(bm, bn, bk, split, warps, stages, form)
