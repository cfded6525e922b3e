"""Built-in suites, shipped inside the package as ``cloakbench.suites`` (see pyproject.toml)."""
