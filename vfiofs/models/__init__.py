"""Device models: the model boundary (api.py, documented in docs/models.md), the definition
loader (definitions.py), the built-in models (registry.py: edu.py, uart.py) and their pure
helpers (spec.py, registers.py, timers.py)."""
