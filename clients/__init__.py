"""Built-in client trainers; importing this package registers them by name."""

from clients.sgd import SGDTrainer
from fedsim.client import register_trainer

register_trainer("sgd", SGDTrainer)

__all__ = ["SGDTrainer"]
