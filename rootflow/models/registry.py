"""Model registry (timm's ``@register_model`` / ``create_model`` pattern) and weight specs.

Weights are data: a :class:`WeightSpec` keeps the URI, sha256 and preprocessing next to a tag,
as timm's ``default_cfgs`` and torchgeo's ``WeightsEnum.meta`` do. No spec here points at the
network: the user passes a URI (local path or ``s3://...``) and rootflow never downloads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_MODELS: dict[str, Callable[..., Any]] = {}


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """Where a model's weights come from and what they expect.

    Attributes:
        uri: local path or object-storage URI given by the user (never a hub download).
        sha256: expected digest (full or >= 8-char prefix); checked before unpickling.
        mean / std: input normalisation the weights were trained with.
        input_size: (H, W) the weights expect.
    """

    uri: str | None = None
    sha256: str | None = None
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    input_size: tuple[int, int] | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def register_model(name: str | None = None) -> Callable[[F], F]:
    """Decorator: register a model factory under ``name`` (default: the function name)."""

    def deco(fn: F) -> F:
        key = name or fn.__name__
        if key in _MODELS and _MODELS[key] is not fn:
            raise ValueError(f"model {key!r} is registered twice")
        _MODELS[key] = fn
        return fn

    return deco


def list_models() -> list[str]:
    _import_builtin()
    return sorted(_MODELS)


def create_model(name: str, **kwargs: Any) -> Any:
    """Build a registered model; an unknown name fails with the list of valid ones."""
    _import_builtin()
    try:
        factory = _MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered: {sorted(_MODELS)}") from None
    return factory(**kwargs)


def _import_builtin() -> None:
    """Import the modules whose factories register themselves (lazily: they import torch)."""
    import importlib

    for mod in ("rootflow.models.rootsam", "rootflow.models.rootquant"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a module not written yet must not hide the others
            if e.name != mod:
                raise
