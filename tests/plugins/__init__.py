"""Plugins for tests: each a module with ``@graphopt.hookimpl`` hooks, loaded with
``get_plugin_manager().register_plugin(module, name=...)`` inside a test (and unregistered after),
or from the CLI with ``graphopt -p tests.plugins.<module>`` (repo root on ``PYTHONPATH``)."""
