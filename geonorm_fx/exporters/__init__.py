"""Deployment hand-off: ONNX export verified in ONNX Runtime, torch.compile, and an AOT package."""
from .compile import compile_model, export_aot, kernel_launches, load_aot
from .onnx import OnnxExport, VerificationError, export_onnx, ort_session

__all__ = ["export_onnx", "OnnxExport", "VerificationError", "ort_session", "compile_model", "export_aot",
           "load_aot", "kernel_launches"]
