"""The artifact: a directory that is safe to load and says what it holds.

    manifest.json        format and versions, target, passes, per-layer quantization, model
                         config, tokenizer files, SHA-256 and size of every other file
    weights.safetensors  every constant of the program (packed weights, scales, zero points)
    program.pt2          ``torch.export.save`` of the final program, its constants stubbed out
    tokenizer files      when the model has a tokenizer

Weights live only in ``weights.safetensors``: the program is saved with zero-stride stubs in
their place and gets the real tensors back at load time, after every hash has been checked."""
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.export import ExportedProgram

from . import __version__

FORMAT = "qcompiler-artifact"
FORMAT_VERSION = 3  # 2: the program takes logits_indices; 3: and KV cache rows of any width (quantized caches)
READS_VERSIONS = (2, 3)
MANIFEST, WEIGHTS, PROGRAM = "manifest.json", "weights.safetensors", "program.pt2"
log = logging.getLogger("qcompiler")


class ArtifactError(ValueError):
    """An artifact that cannot be loaded as it is: the message names the file and the fix."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _stub(t: torch.Tensor) -> torch.Tensor:
    s = torch.zeros((), dtype=t.dtype).expand(t.shape)  # one element of storage
    return torch.nn.Parameter(s, requires_grad=False) if isinstance(t, torch.nn.Parameter) else s


def _tensor_constants(ep: ExportedProgram) -> dict[str, torch.Tensor]:
    return {k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)}


def _weightless(ep: ExportedProgram) -> ExportedProgram:
    return ExportedProgram(
        root=ep.graph_module, graph=ep.graph, graph_signature=ep.graph_signature,
        state_dict={k: _stub(v) for k, v in ep.state_dict.items()},
        range_constraints=ep.range_constraints, module_call_graph=ep.module_call_graph,
        example_inputs=ep.example_inputs, verifiers=ep.verifiers,
        constants={k: _stub(v) if isinstance(v, torch.Tensor) else v for k, v in ep.constants.items()})


def is_artifact(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_output_dir(out: Path) -> None:
    """``out`` may be new, empty, or an artifact (replaced whole on success); nothing else."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"cannot write the artifact to {out}: it is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not is_artifact(out):
        raise ValueError(f"{out} is not empty and holds no qcompiler artifact: choose a new or empty directory")


def save_artifact(out: Path, ep: ExportedProgram, manifest: dict, tokenizer=None) -> dict:
    """Writes the artifact into a sibling temporary directory, then swaps it in for ``out``:
    a failure leaves any previous artifact at ``out`` untouched. Returns the manifest."""
    check_output_dir(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tensors = {**ep.state_dict, **_tensor_constants(ep)}
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp / WEIGHTS, metadata={"format": "pt"})
        torch.export.save(_weightless(ep), tmp / PROGRAM)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        files = sorted(p.name for p in tmp.iterdir())
        tok_files = [f for f in files if f not in (WEIGHTS, PROGRAM)]
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "qcompiler_version": __version__,
                    "torch_version": torch.__version__, **manifest,
                    "tokenizer": {"files": tok_files} if tok_files else None,
                    "files": {f: {"sha256": sha256_of(tmp / f), "bytes": (tmp / f).stat().st_size} for f in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_manifest(path: Path, verify: bool = True) -> dict:
    """Reads ``manifest.json`` and, with ``verify``, checks format, version, and every file's size and hash."""
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such artifact directory")
    mpath = path / MANIFEST
    if not mpath.exists():
        raise ArtifactError(f"{mpath}: missing; {path} is not a qcompiler artifact")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath}: not valid JSON ({e}); recompile the model") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version") not in READS_VERSIONS:
        raise ArtifactError(f"{mpath}: format version {manifest.get('format_version')} but this qcompiler "
                            f"({__version__}) reads versions {READS_VERSIONS}; recompile the model")
    files = manifest.get("files")
    if not isinstance(files, dict) or not {WEIGHTS, PROGRAM} <= set(files) or \
            not all(isinstance(m, dict) and {"sha256", "bytes"} <= set(m) for m in files.values()):
        raise ArtifactError(f"{mpath}: its file list is missing or incomplete (needs {WEIGHTS} and {PROGRAM} "
                            "with sha256 and bytes); recompile the model")
    written = str(manifest.get("torch_version", "?"))
    if written.split(".")[:2] != torch.__version__.split(".")[:2]:
        log.warning("%s was written by torch %s; this is torch %s: loading may fail", path, written, torch.__version__)
    if verify:
        for name, meta in files.items():
            f = path / name
            if not f.exists():
                raise ArtifactError(f"{f}: missing from the artifact")
            size = f.stat().st_size
            if size != meta["bytes"]:
                raise ArtifactError(f"{f}: {size} bytes, the manifest says {meta['bytes']} (truncated or replaced)")
            if sha256_of(f) != meta["sha256"]:
                raise ArtifactError(f"{f}: SHA-256 does not match the manifest (the file was modified)")
    return manifest


def load_program(path: Path, manifest: dict) -> ExportedProgram:
    """The exported program with its weights restored from ``weights.safetensors``."""
    try:
        ep = torch.export.load(path / PROGRAM)
    except Exception as e:  # serialization formats differ across torch releases
        raise ArtifactError(f"{path / PROGRAM}: cannot be loaded by torch {torch.__version__} (written by torch "
                            f"{manifest.get('torch_version')}): {type(e).__name__}: {e}") from e
    weights = load_file(path / WEIGHTS)
    missing = [k for k in (*ep.state_dict, *_tensor_constants(ep)) if k not in weights]
    if missing:
        raise ArtifactError(f"{path / WEIGHTS}: lacks {len(missing)} tensors the program needs, e.g. {missing[0]}")
    for k, v in ep.state_dict.items():
        w = weights[k]
        if w.shape != v.shape or w.dtype != v.dtype:
            raise ArtifactError(f"{path / WEIGHTS}: {k} is {w.dtype}{list(w.shape)}, the program expects "
                                f"{v.dtype}{list(v.shape)}")
        ep.state_dict[k] = torch.nn.Parameter(w, requires_grad=False) if isinstance(v, torch.nn.Parameter) else w
    for k in _tensor_constants(ep):
        ep.constants[k] = weights[k]
    return ep
