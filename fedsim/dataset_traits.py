"""What a registered dataset's registration says besides its loader: how fedsim makes devices of it.

:func:`fedsim.data.loaders.register_dataset` records a dataset's loader in
:data:`~fedsim.data.loaders.DATASETS` and its :class:`DatasetTraits` here. The scenario reads the
traits while it parses ``[data]`` (defaults, refusals), before any data module (and torch) is
imported, so this module imports nothing heavy, and the built-in datasets' traits are declared in
:data:`BUILTIN_TRAITS` beside the names :mod:`fedsim.data.builtin` registers them under.

A dataset without traits (a loader named by import path, a data file) is one whose devices are
its own: one device per user id when it has user ids, else the partitioner the scenario names.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BUILTIN_TRAITS", "DEFAULT_NUM_DEVICES", "DatasetTraits", "dataset_traits", "register_traits", "unregister_traits"]

#: ``[data] num-devices`` of a dataset fedsim partitions, when the scenario does not say.
DEFAULT_NUM_DEVICES = 100


@dataclass(frozen=True)
class DatasetTraits:
    """How fedsim makes devices of one dataset.

    Attributes
    ----------
    partitioned:
        fedsim partitions the dataset itself (it has no user ids): ``num-devices`` defaults to
        :data:`DEFAULT_NUM_DEVICES`, ``partitioner`` to ``"iid"``, and ``"natural"`` is refused.
    max_devices:
        The most devices its training split can serve (one example each), or ``None``.
    data_keys:
        Built from the ``[data]`` section's own keys (``examples-per-device``, ...), so its loader's
        signature is not checked against ``[data]`` parameters.
    """

    partitioned: bool = False
    max_devices: int | None = None
    data_keys: bool = False


#: The built-in datasets (:mod:`fedsim.data.builtin` registers their loaders under these names).
BUILTIN_TRAITS: dict[str, DatasetTraits] = {
    # scikit-learn's digits: 1437 training examples, no user ids
    "digits": DatasetTraits(partitioned=True, max_devices=1437, data_keys=True),
    # Gaussian mixtures generated per device from [data]'s own keys
    "synthetic": DatasetTraits(partitioned=True, data_keys=True),
    # one device per speaking role (natural partition)
    "shakespeare": DatasetTraits(),
}

_TRAITS: dict[str, DatasetTraits] = dict(BUILTIN_TRAITS)


def register_traits(name: str, traits: DatasetTraits) -> None:
    """Record ``traits`` for the dataset registered as ``name``."""
    _TRAITS[name] = traits


def unregister_traits(name: str) -> None:
    """Forget the traits of ``name`` (a dataset registered for a session or a test); a built-in's
    return to :data:`BUILTIN_TRAITS`."""
    if name in BUILTIN_TRAITS:
        _TRAITS[name] = BUILTIN_TRAITS[name]
    else:
        _TRAITS.pop(name, None)


def dataset_traits(name: str) -> DatasetTraits:
    """The traits of the dataset ``[data] dataset = name`` (the defaults for unregistered names)."""
    return _TRAITS.get(name, DatasetTraits())
