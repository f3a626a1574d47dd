"""graphopt's test suite. A package so that test plugins import as ``tests.plugins.<name>``
(``graphopt -p tests.plugins.broken_add`` with the repo root on ``PYTHONPATH``)."""
