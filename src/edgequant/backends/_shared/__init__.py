"""Helpers that several formats share, written once: calibration windows, ONNX Runtime sessions,
token sampling, side files, cached float intermediates and Hugging Face tokenization."""
