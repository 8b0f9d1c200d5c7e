"""deltafleet.codecs: the delta formats both sides agree on, and their streaming decoders.

A neutral package inside ``deltafleet-shared`` (install ``deltafleet-shared[codecs]`` for its
numpy and zstandard): the agent decodes with it on a device, the server round-trips every
delta it builds with it, and neither imports the other. Modules, by what they are:

- ``names``: the codec vocabulary (``IDENTITY``, ``ZSTD``, ``BSDIFF4``, ...);
- ``errors``: ``CodecError`` and its kinds, under ``DeltafleetError``;
- ``source``: random-access inputs (``Source``, ``BytesSource``, ``FileSource``, ...);
- ``tensor_xor``: the tensor-xor container format (header, planes, zigzag, skeleton);
- ``bsdiff_stream``: BSDIFF40 applied streaming (standard library only);
- ``memory``: decode-memory prediction and the cap;
- ``decoders``: ``decode_stream`` (to a sink), ``decode`` (in memory), ``decode_sha256``.

The package exports every name of each module's ``__all__`` (``bsdiff_stream`` excepted): a
name is written once, in the module that defines it.

Encoders live with the server (``deltafleet.server.codecs``); staging a decoded file durably
and containing the decoder in a child live with the agent.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

from . import errors, names
from .errors import *  # noqa: F403
from .names import *  # noqa: F403

if TYPE_CHECKING:
    from .decoders import *  # noqa: F403
    from .memory import *  # noqa: F403
    from .source import *  # noqa: F403
    from .tensor_xor import *  # noqa: F403

# Names and errors import nothing but the standard library (a planner reads codec names
# without numpy); the rest loads on first use. Each lazy module imports only those before it,
# so looking a name up in this order loads nothing its home module would not load anyway.
_LAZY = ("source", "tensor_xor", "memory", "decoders")


def _home(name: str) -> ModuleType:
    for module in _LAZY:
        home = importlib.import_module(f".{module}", __name__)
        if name in home.__all__:
            return home
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __getattr__(name: str) -> Any:
    if name == "__all__":
        lazy = (importlib.import_module(f".{module}", __name__) for module in _LAZY)
        value: Any = sorted({*errors.__all__, *names.__all__, *(n for m in lazy for n in m.__all__)})
    elif name.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    else:
        value = getattr(_home(name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__getattr__("__all__")})
