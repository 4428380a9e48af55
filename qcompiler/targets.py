"""Compilation targets: one frozen config per scheme, validated on construction.
The pipeline dispatches on the config's type (``qcompiler.pipeline``), never on strings."""
from dataclasses import asdict, dataclass
from typing import ClassVar, Optional, Union

METHODS = ("rtn", "imatrix", "gptq", "awq")
# weight-only: imatrix when calibration data is at hand, else rtn (qcompiler.compiler.resolve_method)
AUTO_METHOD = "auto"
# the codes a compressed-tensors checkpoint brings, kept as they are (qcompiler.checkpoint)
CHECKPOINT = "checkpoint"
QAT = "qat"  # codes trained by quantization-aware training (qcompiler.qat), kept as they are
CODED = (CHECKPOINT, QAT)  # methods whose codes come with the model
OBSERVERS = ("minmax", "percentile", "mse")
LM_HEAD_MAX_INCREASE = 0.005  # lm_head_bits="auto": int8 while it costs at most 0.5% perplexity
AUTO = "auto"  # per layer, the largest of 128, 64, 32 dividing its input size (passes.quantize_weights)
GroupSize = Union[int, str, None]


def _check_group_size(group_size: GroupSize, allow_none: bool) -> None:
    if group_size == AUTO or (group_size is None and allow_none):
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 16 \
            or group_size & (group_size - 1):
        allowed = "a power of two >= 16, 'auto' or None (per-channel)" if allow_none else \
            "a power of two >= 16 or 'auto'"
        raise ValueError(f"group size must be {allowed}, got {group_size!r}")


def _check_method(method: str, allowed: tuple[str, ...] = METHODS) -> None:
    if method not in allowed:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(allowed)}")


def _check_bools(cfg, *names: str) -> None:
    for name in names:
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(cfg, name)!r}")


@dataclass(frozen=True)
class Target:
    name: ClassVar[str]

    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}

    @property
    def needs_calibration(self) -> bool:
        return False

    @property
    def scheme(self) -> str:
        return self.name


@dataclass(frozen=True)
class Float(Target):
    """No quantization: capture, normalize and package the model as it is."""
    name: ClassVar[str] = "float"


@dataclass(frozen=True)
class WeightOnly(Target):
    """Integer weights, float activations. ``group_size``: input channels per scale; ``"auto"``: per
    layer, the largest of 128, 64, 32 that divides its input size; None: one scale per output
    channel. ``symmetric=False``: an integer zero point per group."""
    bits: ClassVar[int]
    group_size: GroupSize = AUTO
    symmetric: bool = False
    method: str = "rtn"
    quantize_lm_head: bool = False
    # GPTQ: columns by decreasing Hessian diagonal, static groups. None: on for gptq (as in
    # llm-compressor), off otherwise
    act_order: Optional[bool] = None
    # Each group's range clipped where that lowers its error (passes.quantization.clip_ratios): the output error on
    # calibration data for gptq/awq, the weight error for rtn. None: on for gptq and awq, off for rtn; imatrix
    # searches its ranges itself
    clip: Optional[bool] = None
    # 8: the output projection in int8 per output channel (symmetric, RTN) while the rest follow the
    # scheme: half the bytes of a 16-bit lm_head per decoded token, as llama.cpp's Q8_0 output.
    # "auto": int8 when that costs at most LM_HEAD_MAX_INCREASE of perplexity on the calibration
    # data (passes.lm_head), float otherwise or without data. None: lm_head float (or the scheme's
    # own, with quantize_lm_head)
    lm_head_bits: Optional[Union[int, str]] = None

    def __post_init__(self):
        _check_group_size(self.group_size, allow_none=self.bits == 8)
        if self.lm_head_bits not in (None, 8, AUTO):
            raise ValueError(f"lm_head_bits must be 8, 'auto' or None (lm_head float), got {self.lm_head_bits!r}")
        if self.lm_head_bits == 8 and self.quantize_lm_head:
            raise ValueError("lm_head_bits and quantize_lm_head both set: choose one scheme for lm_head")
        if self.lm_head_bits == AUTO and (self.quantize_lm_head or self.method in (*CODED, "rtn")):
            # the head follows the scheme, or the codes given; rtn has no calibration data to measure with
            object.__setattr__(self, "lm_head_bits", None)
        _check_method(self.method, (*METHODS, AUTO_METHOD, *CODED))
        if self.act_order is None:
            object.__setattr__(self, "act_order", self.method == "gptq")
        if self.clip is None:
            object.__setattr__(self, "clip", self.method in ("gptq", "awq"))
        if self.clip is True and self.method in ("imatrix", AUTO_METHOD):
            raise ValueError(f"clip applies to methods rtn, gptq and awq; {self.method!r} searches its ranges itself")
        _check_bools(self, "symmetric", "quantize_lm_head", "act_order", "clip")
        if self.act_order and self.method != "gptq":
            raise ValueError(f"act_order applies to method 'gptq', not {self.method!r}")

    @property
    def needs_calibration(self) -> bool:
        return self.method not in ("rtn", AUTO_METHOD, *CODED)

    @property
    def scheme(self) -> str:
        g = {None: "per-channel", AUTO: "g128/64/32 per layer"}.get(self.group_size, f"g{self.group_size}")
        m = "" if self.method == "rtn" else f" {self.method}{' act-order' if self.act_order else ''}"  # noqa: E501
        head = {None: "", AUTO: ", lm_head int8 if cheap"}.get(self.lm_head_bits, f", lm_head int{self.lm_head_bits}")
        return f"int{self.bits} {g} {'sym' if self.symmetric else 'asym'}{m}{' clip' if self.clip else ''}{head}"


@dataclass(frozen=True)
class W4A16(WeightOnly):
    """int4 weights in groups of input channels (by default the largest of 128, 64, 32 dividing each
    layer's input size) with an integer zero point per group, 16-bit activations. By default the
    ranges are weighted by calibration activations (imatrix) when the source has calibration data,
    and lm_head is int8 where the calibration data shows that cheap (``lm_head_bits="auto"``)."""
    name: ClassVar[str] = "w4a16"
    bits: ClassVar[int] = 4
    method: str = AUTO_METHOD
    lm_head_bits: Optional[Union[int, str]] = AUTO  # int8 where it costs <= LM_HEAD_MAX_INCREASE perplexity


@dataclass(frozen=True)
class W8A16(WeightOnly):
    """int8 weights, per output channel by default, 16-bit activations."""
    name: ClassVar[str] = "w8a16"
    bits: ClassVar[int] = 8
    group_size: GroupSize = None
    symmetric: bool = True


@dataclass(frozen=True)
class W8A8(Target):
    """int8 weights per output channel (symmetric) and int8 activations: dynamic per token, or
    static per tensor from an ``observer`` over the calibration data. SmoothQuant first
    (``smoothquant_alpha``; None: off) moves activation outliers into the weights."""
    name: ClassVar[str] = "w8a8"
    method: str = "rtn"                          # weights: rtn | gptq
    smoothquant_alpha: Optional[float] = 0.8
    observer: Optional[str] = None               # None: dynamic per-token activation scales
    quantize_lm_head: bool = False

    def __post_init__(self):
        _check_method(self.method, ("rtn", "gptq", *CODED))
        _check_bools(self, "quantize_lm_head")
        if self.method in CODED and (self.smoothquant_alpha is not None or self.observer is not None):
            raise ValueError(f"method {self.method!r} brings its own codes: no smoothquant_alpha or observer")
        a = self.smoothquant_alpha
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1):
            raise ValueError(f"smoothquant_alpha must be in [0, 1] (or None: no SmoothQuant), got {a!r}")
        if self.observer is not None and self.observer not in OBSERVERS:
            raise ValueError(f"unknown observer {self.observer!r}; available: {', '.join(OBSERVERS)}")

    @property
    def needs_calibration(self) -> bool:
        return self.smoothquant_alpha is not None or self.observer is not None or self.method == "gptq"

    @property
    def scheme(self) -> str:
        act = f"static {self.observer}" if self.observer else "dynamic per-token"
        sq = f" smoothquant {self.smoothquant_alpha}" if self.smoothquant_alpha is not None else ""
        return f"int8 per-channel {self.method} x int8 {act}{sq}"


@dataclass(frozen=True)
class FP8(Target):
    """e4m3 weights per output channel (rounded to nearest, or by GPTQ), e4m3 activations with
    dynamic per-token scales."""
    name: ClassVar[str] = "fp8"
    method: str = "rtn"                          # weights: rtn | gptq
    quantize_lm_head: bool = False

    def __post_init__(self):
        _check_method(self.method, ("rtn", "gptq", CHECKPOINT))
        _check_bools(self, "quantize_lm_head")

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq"

    @property
    def scheme(self) -> str:
        return f"fp8 e4m3 per-channel {self.method} x dynamic per-token"


TARGETS: dict[str, type[Target]] = {t.name: t for t in (Float, W4A16, W8A16, W8A8, FP8)}


def make_target(name: str, **options) -> Target:
    """``make_target("w4a16", group_size=64, symmetric=False)``; options a target lacks are ignored
    only when they are ``None`` (not given on the command line)."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; available: {', '.join(TARGETS)}")
    cls = TARGETS[name]
    fields = getattr(cls, "__dataclass_fields__", {})
    given = {k: v for k, v in options.items() if v is not None}
    if given.get("lm_head_bits") == 16:  # an explicit float head, which None (not given) cannot say
        given["lm_head_bits"] = None
    if given.pop("no_smoothquant", False):  # an explicit "off", which None (not given) cannot say
        if name != "w8a8":
            raise ValueError(f"target {name!r} takes no option no_smoothquant")
        given["smoothquant_alpha"] = None
    extra = sorted(set(given) - set(fields))  # NOTE: smoothquant_alpha=None stays: it is a field
    if extra:
        raise ValueError(f"target {name!r} takes no option {', '.join(extra)}")
    return cls(**given)

