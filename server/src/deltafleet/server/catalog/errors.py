"""The catalog's error: :class:`CatalogError` (a model file that is not a valid model).

Defined in ``deltafleet.server.errors`` under the server's error root; named here so that
``inspect`` can import it from its own package.
"""

from __future__ import annotations

from ..errors import CatalogError

__all__ = ["CatalogError"]
