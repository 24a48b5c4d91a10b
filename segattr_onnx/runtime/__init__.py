"""ONNX Runtime: sessions, providers, the chunk loop every method shares, and the executors
that run work items here or on a cluster."""
