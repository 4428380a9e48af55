"""Our own CPU kernels, built on first use with torch's C++ extension tools (g++ and ninja)
into the qcompiler cache:

* ``qc_cpu::wq_gemm`` (``csrc/cpu_wq_gemm.cpp``), weight-only int4/int8 linears
  (``qc_cpu::wq_linear``: it, or a dequantize + GEMM past a row count): with AVX512-VNNI,
  activations quantized to int8 per row and block of 32 k and integer dot products with the
  codes (``int8_activations_ref`` in ``codegen/ops.py`` is what it multiplies); else AVX-512 (or
  AVX2) FMAs in fp32 on weights converted in registers, a weight block converted once for up to
  16 rows (AVX2: 4). The group scale applies once per group to a partial sum; software prefetch
  runs ahead of the weight stream;
* ``qc_cpu::paged_decode`` (``csrc/cpu_attention.cpp``), decode attention read in place from the
  paged KV cache through the block tables (no gathered copy, no mask); ``qc_cpu::paged_attention``
  runs it for decode steps and hands other steps to ``qc::paged_attention``;
* ``qc_cpu::sample_rows`` (``csrc/cpu_sampling.cpp``), the engine's sampler: temperature, top-k,
  top-p and the draw, a few passes per row (``runtime.sampling`` is its reference).

Where the CPU has AVX2 but not AVX-512, ``wq_gemm`` runs an AVX2 form of the same kernel, and
attention and sampling their PyTorch forms. Where it has neither or the build fails,
``available()`` is False: the CPU lowering keeps torch's int4pack/int8pack kernels, attention its
ATen form, sampling its PyTorch form."""
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

log = logging.getLogger(__name__)
SOURCES = [Path(__file__).with_name("csrc") / f for f in ("cpu_wq_gemm.cpp", "cpu_attention.cpp", "cpu_sampling.cpp")]
BLOCK = 16  # output channels per packed block: one fp32 zmm register (two ymm)


def _cpu_flags() -> set[str]:
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


LEVELS = {"vnni": 3, "avx512": 2, "avx2": 1}  # qc_cpu::set_isa's levels


def _isa() -> Optional[str]:
    """The instruction sets our kernels run with here: "vnni" (AVX-512 with VNNI: int8 activations
    in the linears' integer dot products), "avx512" (F, BW: fp32 activations), "avx2" (with FMA:
    the linears only), or None (torch's kernels). ``QCOMPILER_NATIVE``: ``0`` none, ``avx2`` or
    ``avx512`` at most that level, else the CPU's best."""
    mode, flags = os.environ.get("QCOMPILER_NATIVE", "1"), _cpu_flags()
    avx2 = {"avx2", "fma"} <= flags
    if mode == "0":
        return None
    if mode == "avx2" or not {"avx512f", "avx512bw"} <= flags:
        return "avx2" if avx2 else None
    if mode == "avx512" or not {"avx512_vnni", "avx512vl"} <= flags:
        return "avx512"
    return "vnni"


# bf16 GEMMs in hardware (AVX512-BF16 or AMX); without, oneDNN emulates them, slower than fp32.
# Read once here: the CPU paths check it while Dynamo traces them.
BF16_NATIVE = bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


_BUILT = False  # set once the ops are registered; read while Dynamo traces (no file access there)
ISA: Optional[str] = None  # what the registered ops run with (``_isa()``), once available() ran


@lru_cache(maxsize=None)
def available() -> bool:
    """True once the ``qc_cpu`` ops are registered (built here if needed) for this CPU's ``ISA``.
    With AVX2 only, ``wq_gemm``/``wq_linear`` run; decode attention and sampling keep their
    PyTorch forms (``avx512()`` is False)."""
    isa = _isa()
    if isa is None:
        return False
    global _BUILT, ISA
    if hasattr(torch.ops, "qc_cpu") and hasattr(torch.ops.qc_cpu, "sample_rows"):
        torch.ops.qc_cpu.set_isa(LEVELS[isa])
        _BUILT, ISA = True, isa
        return True
    from qcompiler.models import CACHE_DIR
    from torch.utils import cpp_extension
    build = CACHE_DIR / "cpu_kernels" / f"torch{torch.__version__.split('+')[0]}"
    build.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(name="qcompiler_cpu_kernels", sources=[str(f) for f in SOURCES], build_directory=str(build),
                           extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, no ninja: torch's kernels remain
        log.warning("qcompiler: CPU kernel build failed (%s); using torch's packed kernels and ATen attention", e)
        return False

    @torch.library.register_fake("qc_cpu::wq_gemm")
    def _(x, packed, scales, biases, bits, group_size, out_features, bias):
        return x.new_empty(x.shape[0], out_features, dtype=torch.float32)

    @torch.library.register_fake("qc_cpu::wq_linear")
    def _(x, packed, block_scales, block_biases, qweight, scales, zeros, bias, bits, max_native_rows, dense_bf16):
        return x.new_empty(*x.shape[:-1], qweight.shape[0])

    @torch.library.register_fake("qc_cpu::paged_decode")
    def _(query, kv_cache, layer, block_tables, seq_lens, scale, window=0, softcap=0.0):
        return torch.empty_like(query)

    @torch.library.register_fake("qc_cpu::paged_attention")
    def _(query, kv_cache, layer, block_tables, seq_lens, query_start_loc, scale, window=0, softcap=0.0):
        return torch.empty_like(query)
    torch.ops.qc_cpu.set_isa(LEVELS[isa])
    _BUILT, ISA = True, isa
    return True


def built() -> bool:
    """Whether the ops are registered, without building them (safe while Dynamo traces)."""
    return _BUILT


def avx512() -> bool:
    """Whether the AVX-512 ops (decode attention, sampling) run: registered, AVX-512 chosen."""
    return _BUILT and ISA in ("avx512", "vnni")


DECODE_HEAD_DIMS = (16, 32, 64, 96, 128, 256)  # built into qc_cpu::paged_decode


def decode_supported(query: Tensor, kv_cache: Tensor) -> bool:
    """Whether ``qc_cpu::paged_decode`` takes this step: query on the CPU in fp32 or bf16, cache
    fp32, bf16, int8 or fp8 e4m3 (the arithmetic is fp32 either way), a head size it was built
    for, the AVX-512 kernels built (``available()`` ran: ``qcompiler.load`` calls it for CPU programs)."""
    ok = (torch.float32, torch.bfloat16)
    return (avx512() and query.device.type == "cpu" and query.dtype in ok
            and kv_cache.dtype in ok + (torch.int8, torch.float8_e4m3fn) and query.shape[-1] in DECODE_HEAD_DIMS)


def act_block(group: int) -> int:
    """The activation block of the VNNI kernel for a weight group: activations are quantized to
    int8 per row and block (the largest of 32, 16, 8 dividing the group; 0 where none does)."""
    return next((a for a in (32, 16, 8) if group % a == 0), 0)


def vnni_layout(qweight: Tensor, scales: Tensor, bits: int, isa: Optional[str] = None) -> bool:
    """Whether ``pack_native`` packs these weights for the VNNI kernel: ``isa`` (default: the
    chosen ``ISA``) is "vnni" and the group a multiple of 8."""
    group = qweight.shape[1] * (2 if bits == 4 else 1) // scales.shape[1]
    return (isa or ISA) == "vnni" and act_block(group) > 0


def pack_native(qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int,
                isa: Optional[str] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Canonical weights (int4: uint8 ``[N, K/2]``, low nibble first, ``w = (u - 8 - z) * s``;
    int8: int8 ``[N, K]``, ``w = (q - z) * s``) -> (``packed``, ``scales`` and ``biases`` fp32
    ``[N/16, K/G, 16]``, ``bias = -z * s``), N padded to 16 with zero-scale channels. ``packed``:
    for the FMA kernels the canonical bytes, channel-minor within blocks of 16 channels,
    ``[N/16, K/2 or K, 16]``; for the VNNI kernel (``vnni_layout``, for ``isa``) uint8 ``[N/16, K/8 or K/4, 64]``,
    four consecutive k of a channel in each 32-bit lane, int8 codes as ``u = q + 128``. Layouts:
    ``csrc/cpu_wq_gemm.cpp``."""
    N, G = qweight.shape[0], scales.shape[1]
    NB = -(-N // BLOCK)
    s = scales.float()
    b = torch.zeros_like(s) if zeros is None else -zeros.float() * s
    vnni = vnni_layout(qweight, scales, bits, isa)
    if NB * BLOCK != N:
        pad = NB * BLOCK - N
        qweight = torch.cat([qweight, qweight.new_full((pad, qweight.shape[1]), 0x88 if bits == 4 else 0)])
        s, b = (torch.cat([t, t.new_zeros(pad, G)]) for t in (s, b))
    blocks = lambda t: t.reshape(NB, BLOCK, t.shape[1]).transpose(1, 2).contiguous()  # noqa: E731
    if not vnni:
        return blocks(qweight), blocks(s), blocks(b)
    if bits == 4:  # u[n, k], then per 8 k: byte 4j + t = u[j, k + t] | u[j, k + 4 + t] << 4
        u = torch.stack([qweight & 0xF, qweight >> 4], -1).reshape(NB, BLOCK, -1, 2, 4)
        packed = (u[:, :, :, 0] | (u[:, :, :, 1] << 4)).permute(0, 2, 1, 3).reshape(NB, -1, 4 * BLOCK)
    else:  # per 4 k: byte 4j + t = q[j, k + t] + 128
        u = (qweight.view(torch.uint8) ^ 0x80).reshape(NB, BLOCK, -1, 4)
        packed = u.permute(0, 2, 1, 3).reshape(NB, -1, 4 * BLOCK)
    return packed.contiguous(), blocks(s), blocks(b)
