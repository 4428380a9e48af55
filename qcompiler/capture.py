"""Capture: torch.export of the flat-token program ``forward(input_ids[T], positions[T]) -> logits[T, V]``.

The model is called on one packed sequence (``[1, T]``); the token dimension ``T`` is dynamic,
so prefill, decode and chunks are one program. ``aten.linear`` and SDPA stay visible: the
passes match on them."""
import io
import logging
import os
from contextlib import contextmanager, redirect_stderr

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from qcompiler.codegen.attention import new_kv_cache

DEFAULT_MAX_TOKENS = 4096


class FlatTokenModule(nn.Module):
    """Adapts ``model(input_ids=[1, T], position_ids=[1, T]) -> [1, T, V]`` (or ``.logits``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids.unsqueeze(0), position_ids=positions.unsqueeze(0))
        logits = getattr(out, "logits", None)
        if logits is None and isinstance(out, dict):
            logits = out.get("logits")
        if logits is None:
            logits = out[0] if isinstance(out, (tuple, list)) else out
        return logits[0]  # [T, V]


def max_tokens_of(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "max_position_embeddings", None) or DEFAULT_MAX_TOKENS)


def token_dim(max_tokens: int) -> tuple:
    T = Dim("T", min=1, max=max_tokens)
    return ({0: T}, {0: T})  # (input_ids, positions)


def example_inputs(n: int = 16, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(n, dtype=torch.long, device=device), torch.arange(n, dtype=torch.long, device=device)


def device_of(module: nn.Module) -> torch.device:
    """Where the module's weights live (CPU when it has none)."""
    t = next(iter((*module.parameters(), *module.buffers())), None)
    return t.device if t is not None else torch.device("cpu")


def export_flat(module: nn.Module, max_tokens: int) -> ExportedProgram:
    with torch.no_grad():
        return torch.export.export(module, example_inputs(device=device_of(module)), dynamic_shapes=token_dim(max_tokens))


def paged_example_inputs(paged: dict, dtype: torch.dtype, T: int = 16, device: torch.device | str = "cpu") -> tuple:
    """Two sequences of 8 new tokens in blocks of 4: (ids, positions, kv_cache, slot_mapping,
    block_tables, seq_lens, query_start_loc, logits_indices)."""
    ids, pos = example_inputs(T, device)
    long = dict(dtype=torch.long, device=device)
    kv = new_kv_cache(paged["num_layers"], 8, 4, paged["num_kv_heads"], paged["head_dim"], dtype, device)
    return (ids, pos % 8, kv, torch.arange(T, **long), torch.arange(8, **long).view(2, 4), torch.tensor([8, 8], **long),
            torch.tensor([0, 8, 16], **long), torch.tensor([7, 15], **long))


def paged_dynamic_shapes(max_tokens: int) -> tuple:
    """The paged program's dynamic sizes, in its input order: tokens, sequences, KV blocks,
    block size, the KV row, block-table width and logits rows."""
    T, S = Dim("T", min=1, max=max_tokens), Dim("num_seqs", min=1, max=max_tokens)  # NOTE: not "S": sympy's
    # the row: head_dim, or head_dim + the scale's bytes for a quantized cache (codegen.attention)
    kv = {2: Dim("num_blocks", min=1), 3: Dim("block_size", min=1, max=max_tokens), 5: Dim("kv_row", min=1)}
    return ({0: T}, {0: T}, kv, {0: T}, {0: S, 1: Dim("max_blocks", min=1)}, {0: S}, {0: S + 1},
            {0: Dim("num_logits", min=1, max=max_tokens)})


def export_paged(module: nn.Module, max_tokens: int, paged: dict, dtype: torch.dtype) -> ExportedProgram:
    """Exports a program after the paged-attention pass, every runtime size dynamic (the KV
    cache's dtype is not guarded either), on the device of its weights."""
    with torch.no_grad():
        return torch.export.export(module, paged_example_inputs(paged, dtype, device=device_of(module)),
                                   dynamic_shapes=paged_dynamic_shapes(max_tokens))


@contextmanager
def _quiet_torch_logs():
    """torch.export prints and logs whole graphs when it fails; the error we raise says what
    matters. ``QCOMPILE_DEBUG=1`` keeps them."""
    if os.environ.get("QCOMPILE_DEBUG"):
        yield
        return
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def use_exact_attention(model: nn.Module) -> None:
    """A transformers model whose attention computes what SDPA drops (a score soft-cap) is switched
    to its eager attention, in place: the paged rewrite reads the soft-cap from its ops. Models
    are loaded with SDPA (``qcompiler.models``); this is the one place that changes it."""
    cfg = getattr(model, "config", None)
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in (None, "eager") and getattr(cfg, "attn_logit_softcapping", None) and \
            hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")


def capture(model: nn.Module, max_tokens: int | None = None) -> ExportedProgram:
    """Exports ``model`` as the flat-token program. Raises ``ValueError`` naming the cause when
    the model cannot be called or exported with that convention."""
    use_exact_attention(model)
    flat = FlatTokenModule(model).eval()
    try:
        with torch.no_grad():
            out = flat(*example_inputs(4, device_of(model)))
    except Exception as e:  # user code: report what convention it failed
        raise ValueError(f"the model cannot be called as model(input_ids=[1, T], position_ids=[1, T]): "
                         f"{type(e).__name__}: {e}") from e
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 4:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model must return logits [1, T, V] (or .logits); for T=4 it returned {got} after [0]")
    try:
        with _quiet_torch_logs():
            return export_flat(flat, max_tokens or max_tokens_of(model))
    except Exception as e:  # torch.export's reasons are long: keep the first line, chain the rest
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"torch.export could not capture the model: {type(e).__name__}: {first}") from e
