"""Smaller and faster models from a checkpoint (`transferlab optimize`): int8 quantization (`quantize`).
Each method writes its model next to the fp32 reference and a report of what it costs and gains."""
