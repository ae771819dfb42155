"""Low-level I/O below every layer: atomic file writes, the pickle-free blob format, run folders,
checkpoints, optimizer tensors. Nothing here imports the rest of the package."""
