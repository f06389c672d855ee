"""Pipeline stages, one module each; the runner (cai/runner.py) knows their order."""
