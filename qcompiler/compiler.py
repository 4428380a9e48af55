"""The compile driver: source -> capture -> pipeline -> export -> artifact, timed per stage."""
import logging
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Optional
from pathlib import Path

import torch
from torch.export.graph_signature import OutputKind

from .artifact import check_output_dir, save_artifact
from .calibration import CalibrationConfig, load_calibration
from .capture import FlatTokenModule, capture, export_paged, max_tokens_of
from .models import DTYPES, ModelSource, hf_checkpoint_facts, load_source, source_kind
from .pipeline import run_pipeline
from .targets import AUTO_METHOD, W4A16, Target
from .verify import Checker, declared_window, make_probes

log = logging.getLogger("qcompiler")


@dataclass
class CompileReport:
    target: Target
    out: Path
    manifest: dict
    stages: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    float_bytes: int = 0                                     # the model's own parameters and buffers


def check_writable(out: Path) -> None:
    """Fails early, before minutes of work, when ``out`` cannot be written: creates its parent
    and a probe file there (the artifact itself is swapped in at the end)."""
    check_output_dir(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as e:
        raise PermissionError(f"cannot write the artifact to {out}: {e.strerror or e}") from e


@contextmanager
def _stage(stages: dict, name: str):
    t0 = time.perf_counter()
    yield
    stages[name] = round(time.perf_counter() - t0, 3)


def _state_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _least_precise_dtype(model: torch.nn.Module) -> torch.dtype:
    """The float dtype of the model's parameters with the fewest mantissa bits: it sets how far an
    exact pass may move the outputs."""
    floats = {p.dtype for p in model.parameters() if p.is_floating_point()} or {torch.get_default_dtype()}
    return max(floats, key=lambda d: torch.finfo(d).eps)


def _model_dtype(model: torch.nn.Module) -> str:
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return str(floats[0] if floats else torch.get_default_dtype()).removeprefix("torch.")


def _vocab_size(ep) -> int:
    """The size of the captured program's logits' last dimension."""
    outputs = ep.graph_module.graph.find_nodes(op="output")[0].args[0]
    user = [o for o, spec in zip(outputs, ep.graph_signature.output_specs) if spec.kind == OutputKind.USER_OUTPUT]
    return int(user[0].meta["val"].shape[-1])


def _checker(ep, src: ModelSource, max_tokens: int, samples) -> tuple[Checker, dict]:
    """The probes and the float model's outputs on them (``qcompiler.verify``)."""
    vocab = _vocab_size(ep)
    window = declared_window(src.config)
    probes = make_probes(int(vocab), max_tokens, window, samples)
    checker = Checker(FlatTokenModule(src.model).eval(), ep, probes, _least_precise_dtype(src.model))
    return checker, {"enabled": True, "window": window, **probes.describe()}


def has_calibration(src: ModelSource, cfg: CalibrationConfig) -> bool:
    return bool(cfg.file) or src.calibration_data is not None or src.calibration_texts is not None


def resolve_method(target: Target, src: ModelSource, cfg: CalibrationConfig) -> Target:
    """A weight-only target's ``method="auto"`` made concrete: ``imatrix`` when the source has
    calibration data (``--calib-file``, the model file's ``calibration_data()`` or
    ``calibration_texts()``), else ``rtn`` with a warning."""
    if getattr(target, "method", None) != AUTO_METHOD:
        return target
    if has_calibration(src, cfg):
        return replace(target, method="imatrix")
    log.warning("no calibration data: plain RTN ranges (--calib-file TEXT gives activation-weighted ones, "
                "--method rtn silences this)")
    return replace(target, method="rtn")


def resolve_checkpoint(target: Optional[Target], src: ModelSource, requantize: bool) -> Target:
    """A compressed-tensors checkpoint compiles with its own scheme and codes (method ``checkpoint``)
    when ``target`` is None or of the same kind; another target needs ``requantize`` (its decoded
    weights are quantized again). Any other source: ``target``, W4A16 when None."""
    ck = src.checkpoint
    if ck is None or requantize:
        if requantize and ck is not None:
            log.warning("%s: the checkpoint's codes are decoded to float and quantized again for %s",
                        src.path, target.name)
        return target if target is not None else W4A16()
    if target is None or target.name == ck.target.name:
        return ck.target
    raise ValueError(f"{src.path} is a {ck.target.name} checkpoint ({ck.target.scheme}): compile it as it is "
                     f"(no --target, or --target {ck.target.name}) or pass --requantize to quantize its decoded "
                     f"weights for {target.name}")


def compile_model(model: str | ModelSource, target: Optional[Target], out: str | Path, *, dtype: str | None = None,
                  progress: bool = False, calibration: CalibrationConfig | None = None,
                  verify: bool = True, requantize: bool = False) -> CompileReport:
    """Compiles ``model`` (a path or a loaded ``ModelSource``) for ``target`` into the artifact ``out``;
    ``calibration`` says which samples the calibrated methods use (default: 64 × 512 tokens, 16 × 512
    for imatrix). A weight-only target's ``method="auto"`` is resolved first (``resolve_method``); the
    report and the manifest carry the resolved target.
    ``verify`` checks every pass on probe inputs (``qcompiler.verify``): an exact pass that changes
    the program's outputs raises ``VerificationError``; the checks go into the manifest.
    A compressed-tensors checkpoint keeps its codes (``resolve_checkpoint``; ``target`` None: its scheme)."""
    out = Path(out).resolve()
    if not isinstance(model, ModelSource):
        source_kind(str(model))  # bad input fails before anything is created
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; available: {', '.join(DTYPES)}")
    check_writable(out)
    stages: dict[str, float] = {}
    with _stage(stages, "load"):
        src = model if isinstance(model, ModelSource) else load_source(str(model), dtype)
    max_tokens = max_tokens_of(src.model)
    with _stage(stages, "capture"):
        ep = capture(src.model, max_tokens)
    calib, cfg = None, calibration or CalibrationConfig()
    target = resolve_method(resolve_checkpoint(target, src, requantize), src, cfg)
    codes = src.checkpoint.codes if src.checkpoint is not None and not requantize else None
    if target.needs_calibration:
        with _stage(stages, "calibration data"):
            calib = load_calibration(src, cfg, src.config.get("vocab_size"), getattr(target, "method", None))
    samples = calib.samples if calib else None
    checker, verification = None, {"enabled": False}
    if verify:
        checker, verification = _checker(ep, src, max_tokens, samples)
    with torch.no_grad():
        result = run_pipeline(ep, target, progress=progress, samples=samples, checker=checker, codes=codes)
    for rec in result.records:
        stages[f"pass:{rec['name']}"] = rec["seconds"]
    if checker is not None:
        stages["verify"] = verification["seconds"] = round(checker.seconds, 3)
    paged = result.gm.meta["qc_paged"]
    dtype = _model_dtype(src.model)
    with _stage(stages, "export"):
        final = export_paged(result.gm, max_tokens, paged, getattr(torch, dtype))
    manifest = {
        "target": target.to_dict(),
        "model": {"source": src.kind, "path": str(Path(src.path).resolve()), "config": src.config,
                  "dtype": dtype, "float_bytes": _state_bytes(src.model), "hf": hf_checkpoint_facts(src.model),
                  **({"checks": src.checks} if src.checks else {})},
        "program": {"inputs": {"input_ids": "int64[T]", "positions": "int64[T]",
                               "kv_cache": "[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]",
                               "slot_mapping": "int64[T]", "block_tables": "int64[S, max_blocks]",
                               "seq_lens": "int64[S]", "query_start_loc": "int64[S + 1]",
                               "logits_indices": "int64[N]"},
                    "output": "logits[N, V]", "max_tokens": max_tokens, "paged": paged,
                    "vocab_size": _vocab_size(ep)},
        "calibration": calib.describe(cfg) if calib else None,
        "training": src.checkpoint.record if codes is not None else None,
        "passes": result.records,
        "verification": verification,
        "layers": result.layers,
    }
    with _stage(stages, "save"):
        manifest = save_artifact(out, final, manifest, src.tokenizer)
    return CompileReport(target, out, manifest, stages, manifest["model"]["float_bytes"])
