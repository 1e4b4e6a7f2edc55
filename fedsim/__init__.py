"""fedsim: federated-learning simulation with formal user-level differential privacy.

From Python: :func:`fedsim.run` runs a scenario and :func:`fedsim.plan` plans a privacy budget
(:mod:`fedsim.api`; imported on first use, so ``import fedsim`` stays light).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedsim.api import RunOutput, plan, run

__version__ = "0.1.0"
__all__ = ["RunOutput", "__version__", "plan", "run"]


def __getattr__(name: str) -> Any:
    if name in ("run", "plan", "RunOutput"):
        from fedsim import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedsim' has no attribute {name!r}")
