"""Whether this CPU's int8 kernels saturate: x86 without VNNI, where onnxruntime's (and OpenVINO's)
u8 x s8 kernels sum pairs of products in 16 bits before widening (see
`edgequant.decisions.hardware.int8_dot_product`). The int8 accuracy floors of the tests were set
on CPUs with VNNI; on one without it, each test asserts the lower floor measured there, so a broken
quantization still fails while the kernels' saturation does not."""

from edgequant.decisions.hardware import NO_VNNI, int8_dot_product, read_cpu

SATURATING_INT8 = int8_dot_product(read_cpu()[2]) == NO_VNNI
