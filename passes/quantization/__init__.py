"""The quantization math the passes call at compile time: range searches, GPTQ, AWQ's scale search.
The canonical layout and the rounding the ops share stay in ``qcompiler.codegen.quant``."""
from .awq_search import awq_scales
from .gptq_solver import GPTQResult, gptq_quantize
from .rounding import clip_ratios, clip_weight, fake_quantize, search_qparams, weighted_qparams

__all__ = ["GPTQResult", "awq_scales", "clip_ratios", "clip_weight", "fake_quantize", "gptq_quantize",
           "search_qparams", "weighted_qparams"]
