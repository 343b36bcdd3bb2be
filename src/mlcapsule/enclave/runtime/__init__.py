"""Running ONNX models from decrypted buffers (enclave side) and splitting them (provider side)."""
