"""Compilation targets: one frozen config per scheme, validated on construction.
The pipeline dispatches on the config's type (``qcompiler.pipeline``), never on strings."""
from dataclasses import asdict, dataclass
from typing import ClassVar, Optional

METHODS = ("rtn",)


def _check_group_size(group_size: Optional[int], allow_none: bool) -> None:
    if group_size is None and allow_none:
        return
    if not isinstance(group_size, int) or group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"group size must be a power of two >= 16{' or None (per-channel)' if allow_none else ''}, "
                         f"got {group_size!r}")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")


@dataclass(frozen=True)
class Target:
    name: ClassVar[str]

    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}


@dataclass(frozen=True)
class Float(Target):
    """No quantization: capture, normalize and package the model as it is."""
    name: ClassVar[str] = "float"


@dataclass(frozen=True)
class WeightOnly(Target):
    """Integer weights, float activations. ``group_size=None``: one scale per output channel."""
    bits: ClassVar[int]
    group_size: Optional[int] = 128
    symmetric: bool = True
    method: str = "rtn"
    quantize_lm_head: bool = False

    def __post_init__(self):
        _check_group_size(self.group_size, allow_none=self.bits == 8)
        _check_method(self.method)
        for name in ("symmetric", "quantize_lm_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def scheme(self) -> str:
        g = "per-channel" if self.group_size is None else f"g{self.group_size}"
        return f"int{self.bits} {g} {'sym' if self.symmetric else 'asym'}"


@dataclass(frozen=True)
class W4A16(WeightOnly):
    """int4 weights in groups of ``group_size`` input channels (default 128), 16-bit activations."""
    name: ClassVar[str] = "w4a16"
    bits: ClassVar[int] = 4


@dataclass(frozen=True)
class W8A16(WeightOnly):
    """int8 weights, per output channel by default, 16-bit activations."""
    name: ClassVar[str] = "w8a16"
    bits: ClassVar[int] = 8
    group_size: Optional[int] = None


TARGETS: dict[str, type[Target]] = {t.name: t for t in (Float, W4A16, W8A16)}


def make_target(name: str, **options) -> Target:
    """``make_target("w4a16", group_size=64, symmetric=False)``; options a target lacks are ignored
    only when they are ``None`` (not given on the command line)."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; available: {', '.join(TARGETS)}")
    cls = TARGETS[name]
    fields = getattr(cls, "__dataclass_fields__", {})
    given = {k: v for k, v in options.items() if v is not None}
    extra = sorted(set(given) - set(fields))
    if extra:
        raise ValueError(f"target {name!r} takes no option {', '.join(extra)}")
    return cls(**given)

