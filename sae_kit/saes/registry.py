"""Every dictionary class, by name: filled as classes are defined (`SAE.__init_subclass__`).

`load_sae` rebuilds a saved dictionary from the class name in its ``cfg.json``; a new dictionary
file under ``saes/`` is registered by defining its class (and importing the file, which
``saes/__init__.py`` does). Names starting with an underscore are shared bases, not registered.
"""

from __future__ import annotations

REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    if not cls.__name__.startswith("_"):
        old = REGISTRY.get(cls.__name__)
        if old is not None and old is not cls and old.__module__ != cls.__module__:  # (a module reload is fine)
            raise TypeError(f"a dictionary class named {cls.__name__} is already registered "
                            f"({REGISTRY[cls.__name__].__module__}); pick another name")
        REGISTRY[cls.__name__] = cls
    return cls
