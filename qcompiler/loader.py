"""``qcompiler.load``: an artifact back as a callable model, after every check has passed."""
import logging
import os
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch.export import ExportedProgram
from torch.export.passes import move_to_device_pass

from qcompiler.codegen.attention import new_kv_cache
from qcompiler.codegen.workspace import SplitKWorkspace
from qcompiler.runtime.step_inputs import single_sequence

from .artifact import ArtifactError, load_program, read_manifest
from .lowering import Lowered, lower

log = logging.getLogger(__name__)


class CompiledModel:
    """The artifact's program, called like the source model: ``m(input_ids=[1, T], position_ids=[1, T])
    -> logits [1, T, V]`` (or flat ``[T]`` -> ``[T, V]``). Rows of a ``[B, T]`` batch are
    independent sequences, each computed from scratch with a KV cache of its own; the serving
    engine calls ``program_for(kv_dtype)`` itself with a shared paged cache (and a workspace of
    its own). ``mode``: how the program runs (``lowering.MODES``): "aot" is a library compiled
    ahead of time per KV cache dtype (``qcompiler.aot``), built or read from the cache on first
    use. ``program``: the lowered graph (loaded on first use in "aot" mode, where the library
    replaces it). ``lowerings``: what ran at load, in order (``qcompiler.lowering``), one
    ``{"name", "params", "seconds"}`` each. ``workspace``: the split-K workspace the model's own
    calls run in."""

    def __init__(self, path: Optional[Path], manifest: dict, gm: Union[torch.nn.Module, Callable[[], Lowered]],
                 device: torch.device, lowerings: Optional[list[dict]] = None, mode: str = "eager"):
        self.path, self.manifest, self.device, self.mode = path, manifest, device, mode
        self._program, self._make = (gm, None) if isinstance(gm, torch.nn.Module) else (None, gm)
        self.lowerings = lowerings or []
        self.workspace = SplitKWorkspace()
        self._tokenizer = None
        self._compiled: dict[torch.dtype, Callable] = {}

    @property
    def program(self) -> torch.nn.Module:
        if self._program is None:
            self._program, records = self._make()
            self.lowerings[:0] = records
        return self._program

    def program_for(self, kv_dtype: torch.dtype) -> Callable:
        """The program the engine calls with a KV cache of ``kv_dtype``: in "aot" mode the library
        compiled for it (``qcompiler.aot``; where that fails, the lowered graph, with a warning)."""
        if self.mode != "aot":
            return self.program
        if kv_dtype not in self._compiled:
            from . import aot
            t0 = time.perf_counter()
            path = aot.package_path(self.manifest, kv_dtype)
            cached = path.exists()
            try:
                self._compiled[kv_dtype] = aot.compiled_program(self.manifest, kv_dtype, lambda: self.program)
            except Exception as e:  # no C++ compiler, an op Inductor cannot take: the graph still runs
                log.warning("compiling ahead of time failed (%s: %s); running the program uncompiled",
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                self._compiled[kv_dtype] = self.program
                return self.program
            self.lowerings.append({"name": "aot", "params": {"kv_cache_dtype": str(kv_dtype).removeprefix("torch."),
                                                             "package": str(path), "cached": cached},
                                   "seconds": round(time.perf_counter() - t0, 3)})
        return self._compiled[kv_dtype]

    @property
    def max_tokens(self) -> int:
        return self.manifest["program"]["max_tokens"]

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if not self.manifest.get("tokenizer"):
                raise ValueError(f"{self.path}: the artifact has no tokenizer (the model had none)")
            from .models import load_tokenizer
            self._tokenizer = load_tokenizer(self.path)
        return self._tokenizer

    def flat(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``input_ids[T]``, ``positions[T]`` -> ``logits[T, V]``: one sequence through the paged
        program, with a KV cache of its own."""
        T = input_ids.shape[0]
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(f"flat input_ids and positions must both be [T], got {tuple(input_ids.shape)} "
                             f"and {tuple(positions.shape)}")
        if not 1 <= T <= self.max_tokens:
            raise ValueError(f"{T} tokens; this program takes 1 to {self.max_tokens}")
        prog = self.manifest["program"]
        dtype = getattr(torch, self.manifest["model"]["dtype"])
        args = single_sequence(input_ids.to(self.device), positions.to(self.device), prog["paged"], dtype)
        with self.workspace, torch.no_grad():
            return self.program_for(dtype)(*args)

    def chunked(self, kv_cache_dtype: torch.dtype, chunk: int, block_size: int = 16):
        """A ``flat``-like function (``ids[T], positions[T] -> logits[T, V]``) that prefills the
        sequence in chunks of ``chunk`` tokens into a paged cache of ``kv_cache_dtype``, as the
        engine serves it: each chunk's attention reads every earlier token back from the cache."""
        if chunk < 1:
            raise ValueError(f"the prefill chunk must be >= 1 token, got {chunk}")
        paged = self.manifest["program"]["paged"]

        def run(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            T, d = input_ids.shape[0], self.device
            nb = -(-T // block_size)
            kv = new_kv_cache(paged["num_layers"], nb, block_size, paged["num_kv_heads"], paged["head_dim"],
                              kv_cache_dtype, d)
            table = torch.arange(nb, device=d).view(1, nb)
            program, out = self.program_for(kv_cache_dtype), []
            for c0 in range(0, T, chunk):
                c1 = min(T, c0 + chunk)
                if c1 > self.max_tokens:
                    raise ValueError(f"{c1} tokens; this program takes 1 to {self.max_tokens}")
                rows = torch.arange(c0, c1, device=d)
                with self.workspace, torch.no_grad():
                    out.append(program(input_ids[c0:c1].to(d), positions[c0:c1].to(d), kv, rows, table,
                                            torch.tensor([c1], device=d), torch.tensor([0, c1 - c0], device=d),
                                            rows - c0))
            return torch.cat(out)
        return run

    def __call__(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None, positions=None):
        pos = position_ids if position_ids is not None else positions
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if pos is None:
            pos = torch.arange(ids.shape[-1]).expand_as(ids)
        pos = torch.as_tensor(pos, dtype=torch.long)
        if ids.shape != pos.shape or ids.dim() not in (1, 2):
            raise ValueError(f"input_ids {tuple(ids.shape)} and positions {tuple(pos.shape)} must both be [T] or [B, T]")
        if ids.dim() == 1:
            return self.flat(ids, pos)
        return torch.stack([self.flat(i, p) for i, p in zip(ids, pos)])


def resolve_mode(compile: Union[bool, str], device: torch.device) -> str:
    """``compile`` -> how the program runs (``lowering.MODES``). "auto" (the default): compiled
    ahead of time on CPU; on CUDA the uncompiled program, which the engine replays from CUDA
    graphs; the environment's ``QCOMPILER_COMPILE`` (a mode) overrides it. True: "aot" on CPU, "jit"
    (``torch.compile``) on CUDA. False: "eager"."""
    if compile == "auto" and os.environ.get("QCOMPILER_COMPILE"):
        compile = os.environ["QCOMPILER_COMPILE"]
    modes = {"auto": "aot" if device.type == "cpu" else "eager", True: "aot" if device.type == "cpu" else "jit",
             False: "eager", "eager": "eager", "jit": "jit", "aot": "aot"}
    if compile not in modes:
        raise ValueError(f"unknown compile mode {compile!r}; available: auto, aot, jit, eager (or True, False)")
    if modes[compile] == "aot" and device.type != "cpu":
        raise ValueError(f"compile='aot' builds CPU programs; on {device} use 'jit' or 'auto'")
    return modes[compile]


def load(path: str | Path, *, fast: bool = True, compile: Union[bool, str] = "auto", verify: bool = True,
         device: str | torch.device = "cpu") -> CompiledModel:
    """Loads an artifact written by ``qcompile``.

    Args:
        path: the artifact directory.
        fast: swap canonical ops for the fast kernels (CPU: torch's packed kernels, weights
            repacked once, here; CUDA: sibling linears merged, scales laid out for the Triton
            GEMM); a weight-only (``*a16``) artifact also runs its float linears, lm_head
            included, with bf16 weights and activations. The lowerings that ran are recorded in
            the model's ``lowerings``.
        compile: "auto" (default), "aot", "jit", "eager", True or False (``resolve_mode``).
            "aot" reads the program only when its library for a KV cache dtype is first built.
        verify: check every file's size and SHA-256 against the manifest first.
        device: where the program and its weights live ("cpu", "cuda", "cuda:1", ...).
    """
    path = Path(path)
    manifest = read_manifest(path, verify=verify)
    device = torch.device(device)
    mode = resolve_mode(compile, device) if fast else "eager"
    if mode == "aot":
        return CompiledModel(path, manifest, lambda: _lowered(load_program(path, manifest), manifest, device, mode),
                             device, mode=mode)
    return prepare(load_program(path, manifest), manifest, path=path, fast=fast, compile=mode, device=device)


def _lowered(ep: ExportedProgram, manifest: dict, device: torch.device, mode: str) -> Lowered:
    if any(t.device != device for t in (*ep.state_dict.values(), *ep.constants.values())
           if isinstance(t, torch.Tensor)):
        ep = move_to_device_pass(ep, device)
    return lower(ep.module(), manifest["target"]["name"], device.type, mode)


def prepare(ep: ExportedProgram, manifest: dict, *, path: Optional[Path] = None, fast: bool = True,
            compile: Union[bool, str] = "auto", device: str | torch.device = "cpu") -> CompiledModel:
    """The load-time half of ``load`` for a paged program already in memory: moved to ``device``
    and lowered for it (``compile`` as for ``load``)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but torch {torch.__version__} sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device}; available: cpu, cuda")
    mode = resolve_mode(compile, device) if fast else "eager"
    if not fast:
        if any(t.device != device for t in (*ep.state_dict.values(), *ep.constants.values())
               if isinstance(t, torch.Tensor)):
            ep = move_to_device_pass(ep, device)
        return CompiledModel(path, manifest, ep.module(), device, [])
    gm, records = _lowered(ep, manifest, device, mode)
    if mode == "jit":
        gm = torch.compile(gm, dynamic=True)
    return CompiledModel(path, manifest, gm, device, records, mode)


__all__ = ["ArtifactError", "CompiledModel", "load", "prepare"]
