"""The table of buildable components that ``save_pretrained`` / ``from_pretrained`` use.

A component is an ``nn.Module`` class with a method ``get_config() -> dict`` returning its
constructor arguments as plain JSON values, so that ``type(m)(**m.get_config())`` builds the same
architecture (with fresh weights: arguments that only choose where initial weights come from,
such as ``pretrained``, are left out, because ``from_pretrained`` loads the saved weights anyway).
A saved component is ``{"type": <registered name>, **get_config()}``.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from torch import nn

__all__ = ["build_component", "component_config", "register_component", "registered_components"]

ModuleType = TypeVar("ModuleType", bound=type[nn.Module])

_CLASSES: dict[str, type[nn.Module]] = {}
_NAMES: dict[type[nn.Module], str] = {}


def register_component(cls: ModuleType | None = None, *, name: str | None = None):
    """Adds a module class to the table that ``save_pretrained`` / ``from_pretrained`` use.

    The class must define ``get_config() -> dict``: its constructor arguments as JSON values,
    such that ``cls(**module.get_config())`` rebuilds the module's architecture. Register the
    class before calling ``from_pretrained`` on a directory that holds it (importing the module
    that defines and registers it is enough). Usable as a decorator, with or without ``name``.

    Args:
        cls: the ``nn.Module`` subclass.
        name: the type name written to ``config.json``; default: the class name.

    Returns:
        ``cls`` itself (or, when called with only ``name``, a decorator).

    Raises:
        TypeError: ``cls`` is not an ``nn.Module`` subclass or has no ``get_config`` method.
        ValueError: ``name`` is already taken by another class.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> @register_component
        ... class Patchify(nn.Module):
        ...     def __init__(self, channels: int = 8):
        ...         super().__init__()
        ...         self.channels = channels
        ...         self.proj = nn.Conv2d(3, channels, 16, stride=16)
        ...     def get_config(self):
        ...         return {"channels": self.channels}
        ...     def forward(self, x):
        ...         return self.proj(x)
        >>> build_component(component_config(Patchify(4))).channels
        4
    """
    if cls is None:
        return lambda c: register_component(c, name=name)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_component expects an nn.Module subclass, got {cls!r}")
    if not callable(getattr(cls, "get_config", None)):
        raise TypeError(
            f"{cls.__name__} has no get_config() method: define one returning the constructor "
            "arguments as a dict of JSON values, then register the class"
        )
    name = name or cls.__name__
    old = _CLASSES.get(name)
    if old is not None and old is not cls and _qualified(old) != _qualified(cls):
        raise ValueError(
            f"the component name {name!r} is taken by {_qualified(old)}; register "
            f"{_qualified(cls)} under another name: register_component(cls, name='...')"
        )
    if old is not None:  # the same class defined again (a reloaded module, a notebook cell)
        _NAMES.pop(old, None)
    _CLASSES[name] = cls
    _NAMES[cls] = name
    return cls


def registered_components() -> dict[str, type[nn.Module]]:
    """A copy of the table: registered type name -> class.

    Returns:
        ``{name: class}``.

    Example:
        >>> registered_components()["SALAD"].__name__
        'SALAD'
    """
    return dict(_CLASSES)


def component_config(module: nn.Module, role: str = "component") -> dict[str, Any]:
    """``{"type": <registered name>, **module.get_config()}``, checked to be JSON-serialisable.

    Args:
        module: an instance of a registered class.
        role: what the module is in the model (for the error messages), e.g. ``"backbone"``.

    Returns:
        The config ``build_component`` rebuilds the module from.

    Raises:
        ValueError: the class is not registered, or its config is not plain JSON.

    Example:
        >>> from gsra_salad import SALAD
        >>> component_config(SALAD(32, 8, 4, token_dim=0))["type"]
        'SALAD'
    """
    name = _NAMES.get(type(module))
    if name is None:
        raise ValueError(
            f"save_pretrained cannot describe the {role} ({type(module).__name__}): its class is "
            "not in the component registry, so from_pretrained could not rebuild it. Give the "
            "class a get_config() method (its constructor arguments as a dict) and register it "
            "with gsra_salad.models.register_component, or save the weights with "
            "torch.save(model.state_dict(), path) and rebuild the model in code"
        )
    config = module.get_config()
    if not isinstance(config, dict) or "type" in config:
        raise ValueError(
            f"{type(module).__name__}.get_config() must return a dict of constructor arguments "
            f"without a 'type' key, got {config!r}"
        )
    try:
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{type(module).__name__}.get_config() returned values that are not plain JSON "
            f"({err}): return ints, floats, strings, bools, None, lists and dicts only"
        ) from err
    return {"type": name, **config}


def build_component(config: dict[str, Any], source: str = "the config") -> nn.Module:
    """Builds a registered component (fresh weights) from a config of :func:`component_config`.

    Args:
        config: ``{"type": <registered name>, **constructor arguments}``.
        source: where the config comes from (for the error messages), e.g. a file name.

    Returns:
        The new module.

    Raises:
        ValueError: no ``type``, an unknown type, or arguments the constructor rejects.

    Example:
        >>> build_component({"type": "TinyCNN", "out_channels": 16, "width": 8}).out_channels
        16
    """
    if not isinstance(config, dict) or "type" not in config:
        raise ValueError(f"{source}: a component config needs a 'type' key, got {config!r}")
    kwargs = dict(config)
    name = kwargs.pop("type")
    cls = _CLASSES.get(name)
    if cls is None:
        raise ValueError(
            f"{source}: unknown component type {name!r}; registered: {sorted(_CLASSES)}. If it "
            "is your own class, import the module that defines it and register it with "
            "gsra_salad.models.register_component before loading"
        )
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(
            f"{source}: could not build {name} from its config {kwargs} ({err})"
        ) from err


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _register_layers() -> None:
    from ..layers import SALAD, GlobalSpatialRelationAttention

    register_component(GlobalSpatialRelationAttention)
    register_component(SALAD)


_register_layers()
