"""Built-in server strategies; importing this package registers them by name."""

from fedsim.strategy import register_strategy
from strategies.dp_fedavg import DPFedAvg
from strategies.dp_ftrl import DPFTRL
from strategies.fedavg import FedAvg

register_strategy("fedavg", FedAvg)
register_strategy("dp-fedavg", DPFedAvg)
register_strategy("dp-ftrl", DPFTRL)

__all__ = ["DPFTRL", "DPFedAvg", "FedAvg"]
