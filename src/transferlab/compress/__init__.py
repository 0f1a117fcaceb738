"""Smaller and faster models from a checkpoint (`transferlab optimize`): int8 quantization (`quantize`:
model.int8.onnx beside its fp32 model.onnx, quantize.json) and channel pruning (`prune`: pruned.ckpt, the
recovery fine-tune's run in finetune/, prune.json); each report says what the method costs and gains.
`timing`: the CPU latency both measure."""
