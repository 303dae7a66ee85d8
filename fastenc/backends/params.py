"""A module's parameters read without walking its submodules on every call.

``module.parameters()`` walks every submodule (about 120 us for the base student's 77 parameters);
:class:`ParamSlots` keeps the (submodule, name) slots and walks again only after a parameter or
submodule was registered anywhere in the process (torch's global registration hooks count them), so a
per-call check of the weights reads 77 tensors (about 10 us). A parameter whose ``.data`` is replaced
keeps its slot: the check reads its new storage.
"""

from __future__ import annotations

import torch
from torch import nn

#: Parameters and submodules registered anywhere in this process (see :func:`watch_registrations`).
REGISTRATIONS = [0]
_WATCHING: list = []


def _registered(*args) -> None:
    REGISTRATIONS[0] += 1


def watch_registrations() -> None:
    """Count parameter and submodule registrations process-wide (torch's global registration hooks), once."""
    if not _WATCHING:
        from torch.nn.modules import module as _module

        _WATCHING.append(_module.register_module_parameter_registration_hook(_registered))
        _WATCHING.append(_module.register_module_module_registration_hook(_registered))


class ParamSlots:
    """``module``'s parameter tensors, in ``module.modules()`` order (a shared parameter once per slot)."""

    def __init__(self, module: nn.Module):
        watch_registrations()
        self.module = module
        self._slots: list[tuple[nn.Module, str]] | None = None
        self._at = -1  # REGISTRATIONS when the slots were walked

    def tensors(self) -> list[torch.Tensor]:
        slots = self._slots
        if slots is None or self._at != REGISTRATIONS[0]:
            self._at = REGISTRATIONS[0]
            slots = self._slots = [(m, n) for m in self.module.modules() for n, p in m._parameters.items()
                                   if p is not None]
        return [p for m, n in slots if (p := m._parameters.get(n)) is not None]

    def first(self) -> torch.Tensor | None:
        """The first parameter: O(1) while nothing was registered since the slots were walked."""
        if self._slots and self._at == REGISTRATIONS[0]:
            m, n = self._slots[0]
            p = m._parameters.get(n)
            if p is not None:
                return p
        params = self.tensors()
        return params[0] if params else None

    def signature(self) -> tuple:
        """``((data_ptr, dtype, device), ...)``: equal exactly while every parameter keeps its storage, dtype
        and device."""
        return tuple([(p.data_ptr(), p.dtype, p.device) for p in self.tensors()])

    def versions(self) -> tuple:
        """``((data_ptr, version), ...)``: changes also when a parameter is edited in place."""
        return tuple([(p.data_ptr(), p._version) for p in self.tensors()])
