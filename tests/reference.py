"""Plain-PyTorch references written independently of ``codegen.quant``: what a scheme means,
spelled out the slow, obvious way, for the tests to compare the compiler against."""
import copy

import torch


def fake_quant_ref(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize, one group at a time."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    N, K = w.shape
    G = group_size or K
    out = torch.empty_like(w, dtype=torch.float32)
    for n in range(N):
        for g in range(K // G):
            x = w[n, g * G:(g + 1) * G].float()
            if symmetric:
                scale = max(x.abs().max().item() / ((qmax - qmin) / 2), torch.finfo(torch.float32).tiny)
                zero = 0.0
            else:
                lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
                scale = max((hi - lo) / (qmax - qmin), torch.finfo(torch.float32).tiny)
                zero = min(max(qmin - round(lo / scale), qmin), qmax)
            q = torch.clamp(torch.round(x / torch.tensor(scale, dtype=torch.float32)) + zero, qmin, qmax)
            out[n, g * G:(g + 1) * G] = (q - zero) * torch.tensor(scale, dtype=torch.float32)
    return out.to(w.dtype)


def fake_quant_model(model: torch.nn.Module, bits: int, group_size: int | None, symmetric: bool,
                     skip: tuple[str, ...] = ()) -> torch.nn.Module:
    """A copy of ``model`` with every nn.Linear weight (but those named in ``skip``) fake-quantized."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and name not in skip:
                K = mod.weight.shape[1]
                if K % (group_size or K) == 0:
                    mod.weight = torch.nn.Parameter(fake_quant_ref(mod.weight, bits, group_size, symmetric))
    return m
