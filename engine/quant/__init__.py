"""8-bit (FP8 / INT8) linear layers for the DiT, applied from outside by module swap."""
from .linear import (QUANT_MODES, FP8Linear, Int8Linear, QuantLinear,
                     check_quantization, list_quant_modes, quantize_model, weight_bytes)
from .reference import FORMATS, dequantize_rows, quantize_rows, quantized_linear_reference

__all__ = [
    "FORMATS", "FP8Linear", "Int8Linear", "QUANT_MODES", "QuantLinear",
    "check_quantization", "dequantize_rows", "list_quant_modes", "quantize_model",
    "quantize_rows", "quantized_linear_reference", "weight_bytes",
]
