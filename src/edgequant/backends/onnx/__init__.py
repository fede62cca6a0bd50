"""ONNX through the onnxruntime-genai model builder, onnxruntime.quantization and onnxruntime-genai."""
