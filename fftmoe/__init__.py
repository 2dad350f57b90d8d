"""fftmoe: federated fine-tuning of frozen foundation models on edge devices with sparse MoE adapters.

This package holds only the `fftmoe` command dispatcher and cross-role benchmarks; the roles are the
top-level packages `export`, `edge_runtime`, `broker_server` and `hw_profiles`.
"""
