"""qc:: ops (torch.library), quantization math and load-time lowerings."""
from . import attention, ops  # noqa: F401  (registers the qc:: namespace)
from .quant import QuantizedWeight, dequantize_weight_ref, pack_int4, quantize_weight, sqnr_db, unpack_int4

__all__ = ["QuantizedWeight", "dequantize_weight_ref", "pack_int4", "quantize_weight", "sqnr_db", "unpack_int4"]
