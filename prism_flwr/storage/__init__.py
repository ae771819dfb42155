"""What is written to disk: checkpoints, client state and ledger, the exported model, blobs."""
