"""Built-in server strategies; importing this package registers them by name."""

from fedsim.strategy import register_strategy
from strategies.fedavg import FedAvg

register_strategy("fedavg", FedAvg)

__all__ = ["FedAvg"]
