"""Device models: the model boundary (api.py, documented in docs/models.md), the built-in
models (registry.py: edu.py, uart.py, ioat.py) and their pure helpers (spec.py, registers.py,
timers.py). The definition loader that builds them is vfiofs.host.definitions."""
