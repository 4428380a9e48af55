"""Quantization-aware training: fake quantization with a straight-through estimator (STE) on
every linear a target quantizes, trained by self-distillation (or next-token cross entropy), then
converted into the ordinary pipeline's codes (method ``qat``), which keeps them as they are.
Training text may be the model's own: ``sample_sequences`` draws it from the float model.

    model = prepare(model, W4A16(group_size=64, symmetric=True))   # FakeQuantLinear everywhere
    train(model, teacher, samples, steps=200)                       # or your own loop
    codes = convert(model)                                          # module name -> QuantizedWeight
    compile_model(ModelSource(..., checkpoint=codes), None, "build/qat")

The grid is the compile passes' own (``codegen.quant``: groups, symmetric or with integer zero
points, codes in ``[qmin, qmax]``, ``w = (q - zero) * scale``); rounding and clamping pass gradients
straight through inside the range and none outside it. Scales are learned too (``learn_scales``;
their gradient is the derivative with the codes held), or alone (``train_weights=False``), and on
request the norms and biases, which the artifact keeps float; zero points stay the integers they
were initialized to. W8A8 also fake-quantizes each linear's input per token (int8, absmax / 127,
as ``qc::w8a8_linear``). Exactness: the artifact's reference ops compute what the fake-quantized
model computes, weights bit for bit."""
import hashlib
import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qcompiler.codegen.quant import (QuantizedWeight, compute_qparams, dequantize_weight_ref, pack_int4, qrange,
                                    quantize)

from .targets import QAT, W8A8, Target, WeightOnly

SCALE_LR = 0.1  # scales learn at a tenth of the weights' rate: Adam's steps are relative to neither


def ste_round(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


def fake_quantize(w: Tensor, scale: Tensor, zero: Optional[Tensor], bits: int) -> Tensor:
    """``(clamp(round(w / s) + z, qmin, qmax) - z) * s`` per group (``scale [N, groups]``). The
    weights' gradient passes the rounding straight through inside the range and is zero where
    clamped. The scales' is the exact derivative with the codes held (``sum (q - z) * grad`` over
    the group), not LSQ's ``round(w / s) - w / s``, which is zero for weights on their grid."""
    N, K = w.shape
    qmin, qmax = qrange(bits)
    g = scale.shape[1]
    s = scale.float().unsqueeze(-1)
    q = ste_round(w.float().reshape(N, g, K // g) / s.detach())
    z = zero.float().unsqueeze(-1) if zero is not None else 0.0
    q = torch.clamp(q + z, qmin, qmax)
    return ((q - z) * s).reshape(N, K)


def fake_quantize_per_token(x: Tensor) -> Tensor:
    """int8 per token, symmetric, absmax / 127, codes in [-127, 127] (``qc::quantize_per_token``)."""
    xf = x.float()  # fp32 under autocast too: the codes are what qc::quantize_per_token takes
    s = (xf.detach().abs().amax(-1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    return (torch.clamp(ste_round(xf / s), -127, 127) * s).to(x.dtype)


class FakeQuantLinear(nn.Module):
    """A linear whose weight is fake-quantized on the target's grid in every forward."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: Optional[int], symmetric: bool,
                 quantize_input: bool = False, learn_scales: bool = True,
                 init: Optional[QuantizedWeight] = None):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.bits, self.quantize_input = bits, quantize_input
        G = group_size or linear.in_features
        if init is None:
            scale, zero = compute_qparams(linear.weight.detach(), bits, G, symmetric)
        else:
            scale, zero = init.scales.float(), init.zeros
        self.scale = nn.Parameter(scale.float().clone(), requires_grad=learn_scales)
        self.register_buffer("zero", None if zero is None else zero.clone())

    def quantized_weight(self) -> Tensor:
        return fake_quantize(self.weight, self.scale, self.zero, self.bits).to(self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.quantize_input:
            x = fake_quantize_per_token(x)
        return F.linear(x, self.quantized_weight(), self.bias)


def _check_target(target: Target) -> None:
    if isinstance(target, W8A8):
        if target.smoothquant_alpha is not None or target.observer is not None:
            raise ValueError("QAT for w8a8 trains dynamic per-token activations without SmoothQuant: "
                             "use --no-smoothquant and no --observer")
        return
    if not isinstance(target, WeightOnly):
        raise ValueError(f"QAT supports w4a16, w8a16 and w8a8, not {target.name}")
    if target.lm_head_bits == 8 or target.quantize_lm_head:
        raise ValueError("QAT keeps lm_head float: drop --lm-head-bits / --quantize-lm-head")


def linears_to_train(model: nn.Module, target: Target) -> dict[str, nn.Linear]:
    """The linears the target quantizes: every ``nn.Linear`` but the output projection, whose
    input size the group divides (the compile's rule, ``passes.quantize_weights``)."""
    from qcompiler.passes.quantize_weights import layer_group
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or mod is head or name.endswith("lm_head"):
            continue
        if isinstance(target, WeightOnly):
            G = layer_group(target.group_size, mod.in_features) or mod.in_features
            if mod.in_features % G or (target.bits == 4 and mod.in_features % 2):
                continue
        out[name] = mod
    return out


def _grid(target: Target, K: int) -> tuple[int, Optional[int], bool]:
    from qcompiler.passes.quantize_weights import layer_group
    if isinstance(target, W8A8):
        return 8, None, True
    return target.bits, layer_group(target.group_size, K), target.symmetric


def prepare(model: nn.Module, target: Target, learn_scales: bool = True,
            init: Optional[dict[str, QuantizedWeight]] = None) -> nn.Module:
    """Swaps each linear the target quantizes for a ``FakeQuantLinear`` (in place; returns the
    model). ``init``: codes by module name (a PTQ method's) to start from; RTN's otherwise."""
    _check_target(target)
    for name, mod in linears_to_train(model, target).items():
        bits, G, sym = _grid(target, mod.in_features)
        start = (init or {}).get(name)
        if start is not None:  # the weight becomes what the codes decode to, so round(w / s) + z gives them back
            with torch.no_grad():
                w = dequantize_weight_ref(start.qweight, start.scales, start.zeros, bits)
                mod.weight.copy_(w.to(mod.weight.dtype))
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf,
                FakeQuantLinear(mod, bits, G, sym, isinstance(target, W8A8), learn_scales, start))
    return model


def convert(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Back to plain linears whose weights are what the fake quantization computed; returns
    their codes (module name -> canonical ``QuantizedWeight``) for the pipeline (method ``qat``)."""
    codes = {}
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, FakeQuantLinear):
            continue
        with torch.no_grad():
            N, K = mod.weight.shape
            s = mod.scale.detach().float()
            q = quantize(mod.weight.detach(), s, mod.zero, mod.bits, K // s.shape[1])  # fake_quantize's codes
            w = mod.quantized_weight().detach()
        codes[name] = QuantizedWeight(pack_int4(q) if mod.bits == 4 else q, s, mod.zero)
        linear = nn.Linear(K, N, bias=mod.bias is not None, dtype=mod.weight.dtype, device=mod.weight.device)
        with torch.no_grad():
            linear.weight.copy_(w)
            if mod.bias is not None:
                linear.bias.copy_(mod.bias)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, linear)
    return codes


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    loss_first: float
    loss_last: float      # mean of the last tenth of the steps
    curve: list           # (step, loss) at about 20 points
    data_sha256: str
    scale_lr: Optional[float]  # the scales' rate; None where they did not train


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    out = model(input_ids=ids, position_ids=torch.arange(ids.shape[1]).expand_as(ids))
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)


def qat_loss(student: nn.Module, teacher: Optional[nn.Module], ids: Tensor, loss: str) -> Tensor:
    """``kd``: KL(teacher || student) over the next-token distributions, mean per token; ``ce``:
    next-token cross entropy on ``ids``."""
    logits = _logits(student, ids).float()
    if loss == "ce":
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    with torch.no_grad():
        t = F.log_softmax(_logits(teacher, ids).float(), -1)
    return F.kl_div(F.log_softmax(logits, -1).reshape(-1, logits.shape[-1]), t.reshape(-1, t.shape[-1]),
                    log_target=True, reduction="batchmean")


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """bf16 autocast where matmuls run it in hardware (CUDA; CPUs with AVX512-BF16 or AMX), else
    None: fp32 (emulated bf16 is slower)."""
    from qcompiler.codegen.cpu_native import BF16_NATIVE
    return torch.bfloat16 if device.type == "cuda" or BF16_NATIVE else None


def _keep_freed_memory() -> None:
    """glibc: keep freed memory in the heap instead of returning it to the system, so each
    step's activations reuse pages rather than fault new ones in (half a step's time on CPUs)."""
    from qcompiler.runtime.memory import glibc
    libc = glibc()
    if libc is not None:  # else the allocator's own policy stands
        M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
        libc.mallopt(M_TOP_PAD, 256 << 20)


def vectors_to_train(model: nn.Module) -> list[nn.Parameter]:
    """The float vectors a quantized program keeps as they are: norm weights and biases (every
    1-D parameter outside the embeddings and the output projection)."""
    skip = set()
    for get in ("get_input_embeddings", "get_output_embeddings"):
        mod = getattr(model, get, lambda: None)()
        if mod is not None:
            skip |= {id(p) for p in mod.parameters()}
    return [p for p in model.parameters() if p.dim() == 1 and id(p) not in skip]


@torch.no_grad()
def sample_sequences(model: nn.Module, n: int, seq_len: int, start: list[int], seed: int = 0, batch: int = 16,
                     autocast: Optional[torch.dtype] = None, progress: bool = False) -> list[Tensor]:
    """``n`` sequences of ``seq_len`` tokens that ``model`` writes itself at temperature 1, each
    opening with ``start`` (its BOS, say): training text for self-distillation where there is
    none, in the model's own distribution. Uses the model's KV cache where it returns one
    (``past_key_values``, as transformers' models do), else recomputes each prefix. Tokens are
    drawn as the engine draws them (``runtime.sampling.sample_batch``: inverse CDF, one uniform
    per row from a generator seeded with ``seed``)."""
    from tqdm import tqdm

    from qcompiler.runtime.sampling import SamplingParams, sample_batch
    g = torch.Generator().manual_seed(seed)
    temp1 = SamplingParams(temperature=1.0)
    device = next(model.parameters()).device
    out, bar = [], tqdm(total=n * seq_len, desc="sampling", unit="tok", disable=None if progress else True)
    was_training = model.training
    model.eval()
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        for first in range(0, n, batch):
            b = min(batch, n - first)
            ids = torch.tensor(start, dtype=torch.long).expand(b, -1).to(device)
            try:
                res = model(input_ids=ids, use_cache=True)
                past, logits = res.past_key_values, res.logits[:, -1]
            except (TypeError, AttributeError):  # a model without a cache
                past, logits = None, _logits(model, ids)[:, -1]
            while ids.shape[1] < seq_len:
                nxt = torch.tensor(sample_batch(logits.float().cpu(), [temp1] * b, [g] * b), device=device)[:, None]
                ids = torch.cat([ids, nxt], 1)
                bar.update(b)
                if ids.shape[1] == seq_len:
                    break
                if past is not None:
                    res = model(input_ids=nxt, past_key_values=past, use_cache=True)
                    past, logits = res.past_key_values, res.logits[:, -1]
                else:
                    logits = _logits(model, ids)[:, -1]
            out.extend(ids.cpu())
    bar.close()
    model.train(was_training)
    return out


def train(model: nn.Module, teacher: Optional[nn.Module], samples: list[Tensor], steps: int, lr: float = 1e-3,
          batch: int = 4, loss: str = "kd", progress: bool = False, autocast: Optional[torch.dtype] = None,
          on_step: Optional[Callable[[int, float], None]] = None, train_vectors: bool = False,
          train_weights: bool = True, scale_lr: Optional[float] = None) -> TrainResult:
    """AdamW on the fake-quantized linears' weights (but with ``train_weights=False``) and scales
    (where ``learn_scales``), everything else frozen, but for the norms and biases with
    ``train_vectors``. ``lr``: the weights' and vectors' rate; ``scale_lr``: the scales' (default
    ``lr * SCALE_LR``); both follow one cosine to 0. ``batch`` samples a step, cycling through
    ``samples``. ``autocast``: the dtype forward and backward matmuls run in (master weights,
    scales and the fake quantization stay fp32). ``on_step(n, seconds)`` runs before the first
    step (``n`` 0) and after the n-th (``seconds`` of training so far), in eval mode, its own time
    not counted."""
    if steps < 1:
        raise ValueError(f"QAT steps must be >= 1, got {steps}")
    if lr <= 0 or (scale_lr is not None and scale_lr <= 0):
        raise ValueError(f"QAT learning rates must be > 0, got lr {lr}, scale_lr {scale_lr}")
    scale_lr = lr * SCALE_LR if scale_lr is None else scale_lr
    if loss not in ("kd", "ce"):
        raise ValueError(f"unknown QAT loss {loss!r}; available: kd, ce")
    if not samples:
        raise ValueError("QAT needs training data: --train-file, or a model file with calibration_texts() "
                         "or calibration_data()")
    from tqdm import tqdm
    fq = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
    weights, scales = [m.weight for m in fq] if train_weights else [], [m.scale for m in fq if m.scale.requires_grad]
    if not (weights or scales):
        raise ValueError("QAT has nothing to train: the weights, the scales or both")
    vectors = vectors_to_train(model) if train_vectors else []
    for p in model.parameters():
        p.requires_grad_(False)
    for p in weights + scales + vectors:
        p.requires_grad_(True)
    groups = ([{"params": weights + vectors, "lr": lr}] if weights + vectors else []) + (
        [{"params": scales, "lr": scale_lr}] if scales else [])
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    h, losses, tokens, t0, paused = hashlib.sha256(), [], 0, time.perf_counter(), 0.0
    for s in samples:
        h.update(s.numpy().tobytes())
    model.train()
    device = fq[0].weight.device
    if device.type == "cpu":
        _keep_freed_memory()
    if on_step is not None:
        model.eval()
        on_step(0, 0.0)
        model.train()
    bar = tqdm(range(steps), desc="qat", unit="step", disable=None if progress else True)
    for i in bar:
        ids = torch.stack([samples[(i * batch + j) % len(samples)] for j in range(batch)]).to(device)
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            value = qat_loss(model, teacher, ids, loss)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        sched.step()
        losses.append(float(value.detach()))
        tokens += ids.numel()
        bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tokens / (time.perf_counter() - t0 - paused):.0f}")
        if on_step is not None:
            t1 = time.perf_counter()
            model.eval()
            on_step(i + 1, t1 - t0 - paused)
            model.train()
            paused += time.perf_counter() - t1
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    every = max(1, steps // 20)
    tail = losses[-max(1, steps // 10):]
    return TrainResult(steps, tokens, round(time.perf_counter() - t0 - paused, 1), round(losses[0], 5),
                       round(sum(tail) / len(tail), 5), [(i, round(v, 5)) for i, v in enumerate(losses)][::every],
                       h.hexdigest(), scale_lr if scales else None)


def qat_target(target: Target) -> Target:
    """The target the converted codes compile under: the same scheme, method ``qat``."""
    return replace(target, method=QAT)
