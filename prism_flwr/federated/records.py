"""Keys of the records exchanged between the ServerApp and the ClientApps.

Which method uses which key: ``prism_flwr/federated/methods.py``.
"""

SCORES_KEY = "scores"  # server -> client: ArrayRecord {"scores": 8-bit grid bytes or float32 vector}
MASK_KEY = "mask"  # client -> server: ArrayRecord {"mask": uint8 codec bytes}
WEIGHTS_KEY = "weights"  # method = "dense", both ways: ArrayRecord {"weights": float32 vector}
METRICS_KEY = "metrics"
