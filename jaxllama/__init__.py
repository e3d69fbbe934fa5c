"""jaxllama: a JAX/Flax training stack for the Llama model family."""

__version__ = "0.1.0"
