"""Extra model formats for the catalog, one module each.

A module here calls :func:`deltafleet.server.catalog.inspect.register_inspector` with an
:class:`~deltafleet.server.catalog.inspect.Inspector` (format name, a ``sniff`` on the file's
first 64 bytes, an ``inspect`` returning a ``ModelInfo``) when it is imported;
``inspect.inspectors()`` imports every module of this package the first time a file is
inspected. ONNX and TFLite live in ``inspect`` itself.
"""
