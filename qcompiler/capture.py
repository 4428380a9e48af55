"""Capture: torch.export of the flat-token program ``forward(input_ids[T], positions[T]) -> logits[T, V]``.

The model is called on one packed sequence (``[1, T]``); the token dimension ``T`` is dynamic,
so prefill, decode and chunks are one program. ``aten.linear`` and SDPA stay visible: the
passes match on them."""
import torch
from torch import nn
from torch.export import Dim, ExportedProgram

DEFAULT_MAX_TOKENS = 4096


class FlatTokenModule(nn.Module):
    """Adapts ``model(input_ids=[1, T], position_ids=[1, T]) -> [1, T, V]`` (or ``.logits``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids.unsqueeze(0), position_ids=positions.unsqueeze(0))
        logits = getattr(out, "logits", None)
        if logits is None:
            logits = out[0] if isinstance(out, (tuple, list)) else out
        return logits[0]  # [T, V]


def max_tokens_of(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "max_position_embeddings", None) or DEFAULT_MAX_TOKENS)


def token_dim(max_tokens: int) -> tuple:
    T = Dim("T", min=1, max=max_tokens)
    return ({0: T}, {0: T})  # (input_ids, positions)


def example_inputs(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(n, dtype=torch.long), torch.arange(n, dtype=torch.long)


def export_flat(module: nn.Module, max_tokens: int) -> ExportedProgram:
    with torch.no_grad():
        return torch.export.export(module, example_inputs(), dynamic_shapes=token_dim(max_tokens))


def capture(model: nn.Module, max_tokens: int | None = None) -> ExportedProgram:
    """Exports ``model`` as the flat-token program. Raises ``ValueError`` naming the cause when
    the model cannot be called or exported with that convention."""
    flat = FlatTokenModule(model).eval()
    try:
        with torch.no_grad():
            out = flat(*example_inputs(4))
    except Exception as e:  # user code: report what convention it failed
        raise ValueError(f"the model cannot be called as model(input_ids=[1, T], position_ids=[1, T]): "
                         f"{type(e).__name__}: {e}") from e
    if out.dim() != 2 or out.shape[0] != 4:
        raise ValueError(f"the model must return logits [1, T, V]; for T=4 it returned {tuple(out.shape)} after [0]")
    return export_flat(flat, max_tokens or max_tokens_of(model))
