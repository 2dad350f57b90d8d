"""Device side: the torch-free on-device runtime (ONNX Runtime training API, numpy, paho-mqtt,
tokenizers). Imports nothing of fftmoe outside this package; never torch, transformers or onnx."""
