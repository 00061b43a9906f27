"""What both optimizers share: ``foreach`` and ``compile`` as options of each parameter group,
as in :mod:`torch.optim`, and the parameters a step takes."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["FastPathMixin"]

OPTIONS = ("foreach", "compile")


class FastPathMixin:
    """Mixin of the optimizers: ``foreach`` and ``compile`` are constructor defaults stored in
    every parameter group (a group may set its own), so that they travel with ``state_dict``
    and pickles, as :class:`torch.optim.SGD`'s ``foreach`` does. Groups saved without them
    (older checkpoints and pickles) take the optimizer's defaults, else ``None``."""

    def _set_default_options(self, **options: bool | None) -> None:
        """Make ``options`` defaults, given to the groups that do not set their own; called at
        the end of ``__init__``, once the base classes have made the groups."""
        self.defaults.update(options)
        for group in self.param_groups:
            self._fill_options(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._fill_options(self.param_groups[-1])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for key in OPTIONS:
            self.defaults.setdefault(key, None)
        for group in self.param_groups:
            self._fill_options(group)

    def _fill_options(self, group: dict[str, Any]) -> None:
        for key in OPTIONS:
            if key in self.defaults:
                group.setdefault(key, self.defaults[key])
            value = group.get(key)
            if value is not None and not isinstance(value, bool):
                raise TypeError(
                    f"{type(self).__name__}: `{key}` must be a bool or None, got {value!r}"
                )

    def _params_with_grad(self, group: dict[str, Any]) -> list[torch.Tensor]:
        """The parameters of ``group`` that have a gradient; a sparse one is refused, as by
        geoopt's optimizers."""
        params = []
        for point in group["params"]:
            if point.grad is None:
                continue
            if point.grad.is_sparse:
                name = type(self).__name__
                raise RuntimeError(
                    f"{name} does not support sparse gradients, use Sparse{name} instead"
                )
            params.append(point)
        return params
