"""Safety and opt-out stages shared by the pipelines (decisions in filters/safety.py, filters/pii.py)."""
