"""Deployment hand-off: ONNX export verified in ONNX Runtime (also as a cached decoder), torch.compile, and an AOT
package."""
from .compile import compile_model, export_aot, kernel_launches, load_aot
from .decoder import DecoderExport, export_decoder, export_decoder_aot, generate_onnx
from .onnx import OnnxExport, VerificationError, export_onnx, ort_session

__all__ = ["export_onnx", "OnnxExport", "VerificationError", "ort_session", "compile_model", "export_aot",
           "load_aot", "kernel_launches", "export_decoder", "export_decoder_aot", "DecoderExport",
           "generate_onnx"]
