"""Optional dependencies, installed as extras: ``matplotlib`` (``[plot]``) and ``scikit-learn``
(``[datasets]``).

:func:`require` imports one inside the function that needs it; when it is missing, that feature
raises :class:`~hpc_dgrab.errors.UserError` (one line ``error: ...``, exit 2 from a command) naming
the extra to install. Nothing else in the package imports them.
"""
from __future__ import annotations

import importlib
import logging
from types import ModuleType

from hpc_dgrab.errors import UserError

log = logging.getLogger(__name__)

#: top-level module -> (distribution name, extra that installs it)
EXTRAS = {
    "matplotlib": ("matplotlib", "plot"),
    "sklearn": ("scikit-learn", "datasets"),
}


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` (e.g. ``"matplotlib.figure"``) for ``feature`` (e.g. ``"plotting"``).

    Raises UserError ``"<feature> needs <distribution>: pip install 'hpc_dgrab[<extra>]'"`` when
    its top-level package cannot be imported.
    """
    top = module.split(".")[0]
    dist, extra = EXTRAS[top]
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # absent, or installed without a dependency of its own
        log.debug("cannot import %s: %s", module, exc)
        raise UserError(f"{feature} needs {dist}: pip install 'hpc_dgrab[{extra}]'") from None
