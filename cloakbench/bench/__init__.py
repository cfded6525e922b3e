"""The bench: suites, protocol, metrics, runner, caches and run folders."""
