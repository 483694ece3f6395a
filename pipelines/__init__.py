"""pipelines: one YAML recipe from raw text to a trained, compressed, evaluated, published model."""

__version__ = "0.1.0"
