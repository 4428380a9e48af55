"""FX passes, one family per file; ``qcompiler.pipeline`` orders them per target."""
from .fuse import fuse_weight_only
from .normalize import normalize
from .paged_attention import paged_attention
from .quantize_weights import linear_nodes, output_linears, quantize_weights

__all__ = ["fuse_weight_only", "linear_nodes", "normalize", "output_linears", "paged_attention", "quantize_weights"]
