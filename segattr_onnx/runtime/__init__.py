"""ONNX Runtime: sessions, providers, and the chunked executor every method shares."""
