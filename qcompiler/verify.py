"""Translation validation: every pass of the pipeline checked on probe inputs as it runs.

The probes are a few seeded sequences: random token ids, a calibration window when the target
calibrates, and one sequence longer than any attention window the model declares (a dropped
sliding window shows only past the window). The float model (the source model, called as the
captured program is) and the program after each pass run on them; each pass's record gets the distance of its outputs to the program
before it (``sqnr_db``) and to the float program (``sqnr_db_vs_float``). A pass that must keep
the program's meaning (an *exact* pass) fails the compile when it moves the outputs beyond its
tolerance; a lossy pass only records its error.

A program before the paged-attention rewrite is called once per sequence, ``prog(ids[T],
positions[T]) -> logits[T, V]``. A paged program runs the same sequences, plus a copy of the first
sequence's prefix, packed into two steps over one KV cache with shuffled block tables: each
sequence's first half, then the rest against its cached first half. A causal program's logits on
a prefix are its logits on the sequence's first rows, so the copy needs no call of its own and
every step packs several sequences: the check covers packing, block tables and cached context."""
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from qcompiler.codegen.quant import sqnr_db
from qcompiler.runtime.step_inputs import step_inputs

from .capture import device_of

RANDOM_LENGTH = 128           # the random-token sequence; its prefix copy is a third of it
CALIB_LENGTH = 96             # tokens taken from the first calibration sample
WINDOW_MARGIN = 64            # the long probe's tokens past the largest declared window
KEPT_ROWS = 256               # a longer sequence's logits are compared on its last rows only
BLOCK_SIZE = 16
# Exact passes: max |Δ| <= RTOL[dtype] * max |reference logit|. Wide enough for reordered float
# arithmetic through every layer, far below what a changed computation does to the logits.
RTOL = {torch.float32: 1e-3, torch.bfloat16: 6e-2, torch.float16: 2e-2}
# Once activations are rounded (W8A8, FP8: a discontinuous program), reordered float arithmetic
# flips some roundings and moves the logits by more than RTOL; an exact pass then must keep its
# change at least this far below the quantization error the program already has (sqnr vs float).
ROUNDING_MARGIN_DB = 10.0
WINDOW_KEYS = ("sliding_window", "attention_window", "attention_chunk_size")


class VerificationError(ValueError):
    """An exact pass changed the program's outputs beyond its tolerance."""


def declared_window(config: dict) -> Optional[int]:
    """The largest attention window a model config declares (sliding window, chunked attention),
    or None when its attention is global."""
    if config.get("use_sliding_window") is False:
        return None
    sizes = [v for k in WINDOW_KEYS for v in _flat(config.get(k)) if isinstance(v, int) and v > 0]
    return max(sizes, default=None)


def _flat(v):
    return v if isinstance(v, (list, tuple)) else [v]


@dataclass(frozen=True)
class Probes:
    sequences: tuple[Tensor, ...]     # int64 [T_i]; the first is compared on every row
    kept: tuple[int, ...]             # rows compared per sequence: its last ``kept[i]`` tokens
    prefix: int                       # the paged run's extra sequence: ``sequences[0][:prefix]``
    past_window: Optional[int] = None  # the declared window the last sequence runs past

    def __post_init__(self):
        assert self.kept[0] == self.sequences[0].shape[0] >= self.prefix >= 2, "probe 0 compared whole"

    @property
    def tokens(self) -> int:
        return sum(int(s.shape[0]) for s in self.sequences)

    def describe(self) -> dict:
        return {"sequences": [int(s.shape[0]) for s in self.sequences], "tokens": self.tokens,
                "compared_rows": sum(self.kept) + self.prefix, "past_window": self.past_window}


def make_probes(vocab: int, max_tokens: int, window: Optional[int] = None,
                samples: Optional[list[Tensor]] = None, seed: int = 0) -> Probes:
    """A seeded random sequence, a window of the first calibration sample, and, when the model
    declares an attention window shorter than ``max_tokens``, one sequence past it."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (min(RANDOM_LENGTH, max_tokens),), generator=g)]
    calib = next((s.reshape(-1) for s in samples or [] if s.numel() >= 2), None)
    if calib is not None:
        seqs.append(calib[:min(CALIB_LENGTH, max_tokens)].long())
    past = window if window is not None and window < max_tokens else None
    if past is not None:
        seqs.append(torch.randint(0, vocab, (min(window + WINDOW_MARGIN, max_tokens),), generator=g))
    kept = tuple(min(int(s.shape[0]), KEPT_ROWS) for s in seqs)
    return Probes(tuple(seqs), (int(seqs[0].shape[0]),) + kept[1:], max(2, int(seqs[0].shape[0]) // 3), past)


def _logits(out) -> Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _run_flat(prog, probes: Probes, device: torch.device) -> Tensor:
    rows = []
    for seq, kept in zip(probes.sequences, probes.kept):
        T = seq.shape[0]
        out = _logits(prog(seq.to(device), torch.arange(T, device=device)))
        rows.append(out[T - kept:].float())
    return torch.cat([*rows, rows[0][:probes.prefix]])


def _run_paged(prog, probes: Probes, paged: dict, dtype: torch.dtype, device: torch.device, seed: int) -> Tensor:
    seqs = [*probes.sequences, probes.sequences[0][:probes.prefix]]
    kept = [*probes.kept, probes.prefix]
    lens = [int(s.shape[0]) for s in seqs]
    counts = [-(-T // BLOCK_SIZE) for T in lens]
    ids = torch.randperm(sum(counts), generator=torch.Generator().manual_seed(seed)).tolist()
    tables, at = [], 0
    for c in counts:
        tables.append(ids[at:at + c])
        at += c
    kv = torch.zeros(paged["num_layers"], 2, sum(counts), BLOCK_SIZE, paged["num_kv_heads"], paged["head_dim"],
                     dtype=dtype, device=device)
    halves = [max(1, T // 2) for T in lens]
    per_seq: list[list[Tensor]] = [[] for _ in lens]
    steps = [(list(range(len(lens))), [0] * len(lens), halves),
             ([i for i, T in enumerate(lens) if T > halves[i]], halves, lens)]
    for active, starts, ends in steps:
        if not active:
            continue
        new = [seqs[i][starts[i]:ends[i]].tolist() for i in active]
        inp = step_inputs([tables[i] for i in active], [starts[i] for i in active], new, BLOCK_SIZE)
        rows, n_rows, row0 = [], [], 0
        for i, toks in zip(active, new):  # the step's rows whose logits are compared
            first = max(starts[i], lens[i] - kept[i])
            rows += range(row0 + first - starts[i], row0 + len(toks))
            n_rows.append(max(0, len(toks) - (first - starts[i])))
            row0 += len(toks)
        if not rows:
            continue
        out = _logits(prog(*inp._replace(logits_indices=torch.tensor(rows)).args(kv))).float()
        for i, chunk in zip(active, out.split(n_rows)):
            per_seq[i].append(chunk)
    return torch.cat([torch.cat(parts) for parts in per_seq])


def run_program(prog, probes: Probes, dtype: torch.dtype, paged: Optional[dict] = None, seed: int = 0) -> Tensor:
    """The program's logits on the probes' compared rows, ``[sum(kept) + prefix, V]`` in float32
    (each sequence's kept rows in order, then the prefix copy's). ``paged``
    (the paged pass's facts: layers, KV heads, head size) marks a paged program; by default it
    is read from the program's ``meta``."""
    module = prog.module() if isinstance(prog, torch.export.ExportedProgram) else prog
    device = device_of(module)
    paged = paged or getattr(module, "meta", {}).get("qc_paged")
    with torch.no_grad():
        if paged:
            return _run_paged(module, probes, paged, dtype, device, seed)
        return _run_flat(module, probes, device)


def _tolerance(ref: Tensor, dtype: torch.dtype) -> float:
    return RTOL.get(dtype, RTOL[torch.float32]) * ref.abs().max().item()


class Checker:
    """Holds the float model's and the latest program's outputs on the probes; ``check`` runs the
    program a pass produced, records its distances, and fails an exact pass beyond its tolerance.

    The float reference is the source model itself, called as ``capture`` calls it: the captured
    program computes the same function, and the first check therefore covers the capture too
    (when it fails, the captured program is run to tell which of the two changed the outputs)."""

    def __init__(self, model: torch.nn.Module, captured, probes: Probes, dtype: torch.dtype):
        self.probes, self.dtype, self.captured = probes, dtype, captured
        t0 = time.perf_counter()
        self.float_out = self.prev = run_program(model, probes, dtype)
        self.seconds = time.perf_counter() - t0
        self.rounding = False  # a pass before quantized activations

    def check(self, name: str, prog, exact: bool, rounds_activations: bool = False) -> dict:
        """``rounds_activations``: the pass quantizes activations; exact passes after it are held to
        ``ROUNDING_MARGIN_DB`` below the program's error instead of ``RTOL``."""
        t0 = time.perf_counter()
        out = run_program(prog, self.probes, self.dtype)
        if not bool(torch.isfinite(out).all()):
            raise VerificationError(f"pass {name} made the program's outputs non-finite (NaN or inf)")
        diff = out - self.prev
        err, tol = diff.abs().max().item(), _tolerance(self.prev, self.dtype)
        record = {"probe_tokens": self.probes.tokens, "max_abs_err": float(f"{err:.3g}"),
                  "sqnr_db": round(sqnr_db(self.prev, out), 2),
                  "sqnr_db_vs_float": round(sqnr_db(self.float_out, out), 2)}
        if exact and self.rounding:
            need = round(sqnr_db(self.float_out, self.prev) + ROUNDING_MARGIN_DB, 2)
            record["tolerance_sqnr_db"] = need
            if not record["sqnr_db"] >= need:
                raise VerificationError(f"pass {name} changed the program's outputs (SQNR {record['sqnr_db']:.1f} dB "
                                        f"against the program before it; activations are rounded, so at least "
                                        f"{need:.1f} dB is required)")
        elif exact:
            record["tolerance"] = float(f"{tol:.3g}")
            if not err <= tol:  # NOTE: also catches NaN
                self._blame_capture()
                raise VerificationError(f"pass {name} changed the program's outputs "
                                        f"(max |Δ| {err:.1e} > {tol:.0e})")
        self.rounding = self.rounding or rounds_activations
        self.prev = out
        record["seconds"] = round(time.perf_counter() - t0, 3)
        self.seconds += record["seconds"]
        return record

    def _blame_capture(self) -> None:
        if self.prev is not self.float_out or self.captured is None:  # not the first check
            return
        got = run_program(self.captured, self.probes, self.dtype)
        err, tol = (got - self.float_out).abs().max().item(), _tolerance(self.float_out, self.dtype)
        if not err <= tol:
            raise VerificationError(f"torch.export captured a program whose outputs differ from the model's "
                                    f"(max |Δ| {err:.1e} > {tol:.0e})")
