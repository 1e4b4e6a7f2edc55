"""Built-in client trainers; importing this package registers them by name."""

from clients.opacus_trainer import OpacusTrainer
from clients.sgd import SGDTrainer
from fedsim.client import register_trainer

register_trainer("sgd", SGDTrainer)
register_trainer("opacus", OpacusTrainer)

__all__ = ["OpacusTrainer", "SGDTrainer"]
