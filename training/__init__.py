"""Training of the project's own single-shot network (PyTorch; not part of the runtime package)."""
