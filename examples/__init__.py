"""Small programs built on keeplink's public API, to copy from (see examples/README.md).

Each one runs from the repository root (``python -m examples.thermostat``,
``python -m examples.modbus_example``, …) and ``tests/test_examples.py`` runs every one of
them end to end.
"""
