"""Framework adapters, imported as ``gradwatch.integrations``."""
