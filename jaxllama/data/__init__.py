"""Input pipeline. The only package allowed to import TensorFlow (lazily, per source)."""
