"""The PyTorch baseline: the source model run by transformers in float32."""
