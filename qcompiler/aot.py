"""Ahead-of-time compiled CPU programs (AOTInductor), cached per machine.

``compiled_program(model, kv_dtype)`` returns the artifact's paged program compiled by Inductor
into a shared library for this CPU and this KV cache dtype: every runtime size dynamic (tokens,
sequences, blocks, block size, logits rows), the ``qc::`` Python ops and our C++ ops called from
the library through torch's dispatcher. A build costs about a minute on 2 cores and is cached
in ``cache_root()/<key>/``, so later starts load it in well under a second, without
reading or lowering the exported program.

The key covers everything the library depends on: the artifact's program and weights (their
SHA-256 from the manifest), torch's version, this package's code, the CPU's instruction sets
(and the level our kernels run at), the KV cache dtype and torch's thread count (Inductor's
kernels are built for one). An artifact is never extended with native code: the libraries live
in the local cache, built here or by ``qcompile`` on this machine.
"""
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from qcompiler.codegen import cpu_native

log = logging.getLogger(__name__)
PACKAGE = "program.pt2"
_ISA = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
        "amx_tile", "amx_bf16", "amx_int8", "avx_vnni")


def cache_root() -> Path:
    """``QCOMPILER_AOT_CACHE``, else ``aot/`` in the qcompiler cache."""
    from qcompiler.models import CACHE_DIR
    return Path(os.environ.get("QCOMPILER_AOT_CACHE") or CACHE_DIR / "aot")


@lru_cache(maxsize=None)
def _code_hash() -> str:
    """SHA-256 of this package's Python and C++ sources (the lowerings and ops a library calls)."""
    h = hashlib.sha256()
    roots = {Path(m.__file__).parent for m in _modules()}
    for root in sorted(roots):
        for f in sorted(root.rglob("*")):
            if f.suffix in (".py", ".cpp", ".h") and "__pycache__" not in f.parts:
                h.update(str(f.relative_to(root)).encode())
                h.update(f.read_bytes())
    return h.hexdigest()


def _modules():
    import qcompiler
    import qcompiler.codegen
    import qcompiler.passes
    import qcompiler.runtime
    return (qcompiler, qcompiler.codegen, qcompiler.passes, qcompiler.runtime)


def cache_key(manifest: dict, kv_dtype: torch.dtype) -> str:
    files = manifest.get("files", {})
    parts = {
        "program": files.get("program.pt2", {}).get("sha256"), "weights": files.get("weights.safetensors", {}).get("sha256"),
        "target": manifest["target"], "torch": torch.__version__, "code": _code_hash(),
        "isa": sorted(set(_ISA) & cpu_native._cpu_flags()), "native": cpu_native.available() and cpu_native.ISA,
        "kv_cache_dtype": str(kv_dtype),
        # Inductor writes the thread count into its kernels' parallel regions
        "threads": torch.get_num_threads(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def package_path(manifest: dict, kv_dtype: torch.dtype) -> Path:
    return cache_root() / cache_key(manifest, kv_dtype) / PACKAGE


def build(gm: torch.nn.Module, manifest: dict, kv_dtype: torch.dtype, out: Path) -> Path:
    """Exports ``gm`` (a CPU program lowered for ``"aot"``) with every runtime size dynamic and
    compiles it into the package ``out``, written whole or not at all."""
    from qcompiler.capture import paged_dynamic_shapes, paged_example_inputs
    paged, max_tokens = manifest["program"]["paged"], manifest["program"]["max_tokens"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{os.getpid()}-{out.name}"  # aoti wants the .pt2 suffix
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecations, not the user's
            ep = torch.export.export(gm, paged_example_inputs(paged, kv_dtype),
                                     dynamic_shapes=paged_dynamic_shapes(max_tokens), strict=False)
            torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def load_package(path: Path) -> Callable:
    cpu_native.available()  # the library calls our ops by name: they must be registered first
    runner = torch._inductor.aoti_load_package(str(path))

    def program(*args):
        with torch.no_grad():
            return runner(*args)
    return program


def compiled_program(manifest: dict, kv_dtype: torch.dtype, lowered: Callable[[], torch.nn.Module]) -> Callable:
    """The AOT-compiled program for ``kv_dtype``: from the cache, else built from ``lowered()``
    (the program lowered for ``"aot"``) and cached. A cached package that fails to load is
    rebuilt."""
    path = package_path(manifest, kv_dtype)
    if path.exists():
        try:
            return load_package(path)
        except Exception as e:  # a torch or compiler change the key missed, a truncated file
            log.info("cached compiled program %s does not load (%s: %s); compiling again", path, type(e).__name__, e)
            shutil.rmtree(path.parent, ignore_errors=True)
    log.info("compiling the program ahead of time for this CPU (KV cache %s); cached for later starts in %s",
             str(kv_dtype).removeprefix("torch."), path.parent)
    t0 = time.perf_counter()
    build(lowered(), manifest, kv_dtype, path)
    log.info("compiled in %.0f s", time.perf_counter() - t0)
    return load_package(path)
