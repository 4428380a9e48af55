"""FX passes, one family per file; ``qcompiler.pipeline`` orders them per target."""
from .checkpoint import checkpoint_codes
from .fuse import fuse_weight_only
from .gptq import gptq
from .imatrix import imatrix
from .lm_head import quantize_lm_head_if_cheap
from .normalize import normalize
from .paged_attention import paged_attention
from .quantize_activations import quantize_fp8, quantize_w8a8
from .quantize_weights import linear_nodes, output_linears, quantize_weights
from .smooth import awq, smoothquant

__all__ = ["awq", "checkpoint_codes", "fuse_weight_only", "gptq", "imatrix", "linear_nodes", "normalize", "output_linears", "paged_attention",
           "quantize_fp8", "quantize_lm_head_if_cheap", "quantize_w8a8", "quantize_weights", "smoothquant"]
