"""How many positions to score per engine call: a window's logits at a large vocabulary are big
(512 x 262,144 float32 is 0.5 GB, and an engine holds its output buffer besides what it hands
over), so runners that can continue a window from their KV cache score it a slice at a time.
A slice reads the earlier ones' keys and values back from the engine's cache, in the cache's own
precision (OpenVINO's is u8 on this CPU), as generation past the prompt does."""

# Bytes of float32 logits one call may produce; the slice is the power of two under it (32..512).
# 128 MiB keeps a 512-token window of a 49k vocabulary (the default model's, 100 MB) in one call,
# so its figures are those of a whole-window run; Gemma-3's 262k vocabulary goes 128 rows at a time.
SLICE_BYTES = 128 << 20


def rows_per_slice(vocab: int) -> int:
    rows = 512
    while rows > 32 and rows * vocab * 4 > SLICE_BYTES:
        rows //= 2
    return rows
