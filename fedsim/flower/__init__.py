"""The Flower bridge: fedsim strategies on a Flower server, fedsim trainers in a Flower ClientApp.

* :mod:`fedsim.flower.strategy`: :class:`FedsimStrategy`, a Flower Message-API strategy wrapping
  any fedsim strategy (server-side validation, participation ledger, privacy accounting);
* :mod:`fedsim.flower.executor`: :class:`~fedsim.flower.executor.FlowerGridExecutor`, the
  engine's cohort executor on a Flower grid (roster, train messages, reply validation);
* :mod:`fedsim.flower.server_app`: the app's ``ServerApp`` (``flwr run .``);
* :mod:`fedsim.flower.protocol`, :mod:`fedsim.flower.records`: messages and record conversion;
* :mod:`fedsim.flower.device`: a device's participation ledger on the SuperNode's disk;
* :mod:`fedsim.flower.simulation`: ``fedsim run --backend flower`` (Flower's simulation engine);
* :mod:`fedsim.flower.client_app`: the app's ``ClientApp`` (one SuperNode is one device), beside
  the bridge it talks to.

See docs/flower.md.
"""

from fedsim.flower.records import ParamLayout, RecordError
from fedsim.flower.strategy import FedsimStrategy

__all__ = ["FedsimStrategy", "ParamLayout", "RecordError"]
