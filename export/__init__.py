"""Workstation side: PyTorch -> ONNX -> ONNX Runtime training artifacts for the frozen backbone with
FFT-MoE adapters, one artifact set per device budget tier. Needs the `export` extra (torch)."""
