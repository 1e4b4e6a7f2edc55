"""fedsim: federated-learning simulation with formal user-level differential privacy."""

__version__ = "0.1.0"
