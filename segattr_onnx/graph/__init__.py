"""Reading and rewriting ONNX graphs: load safely, infer shapes, catalogue kernels, rewrite."""
