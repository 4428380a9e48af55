"""qc:: ops (torch.library), their kernels, the canonical quantized layout and load-time lowerings."""
from . import act_quant, attention, ops  # noqa: F401  (registers the qc:: namespace)
from . import triton_attention, triton_linear, triton_scaled_mm  # noqa: F401  (the ops' CUDA kernels)
from .quant import QuantizedWeight, dequantize_weight_ref, pack_int4, quantize_weight, sqnr_db, unpack_int4

__all__ = ["QuantizedWeight", "dequantize_weight_ref", "pack_int4", "quantize_weight", "sqnr_db", "unpack_int4"]
