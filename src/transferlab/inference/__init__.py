"""After training: a checkpoint as a plain inference model (`model`), the models predict runs
(`predictors`: checkpoint, TorchScript, ONNX Runtime), and the jobs behind `transferlab predict`,
`export` and `analyze`."""
