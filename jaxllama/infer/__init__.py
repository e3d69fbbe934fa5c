"""Inference: the batched KV-cache engine, sampling, chat templates, and the generate/eval drivers.

``Engine(params, arch, layout).generate(prompt_ids, max_new_tokens, Sampling(...))`` is the library
entry point; ``jaxllama.infer.generate.load``/``generate`` and ``jaxllama.infer.evaluate.evaluate``
are what the ``generate`` and ``eval`` verbs call.
"""

from jaxllama.infer.engine import Completion, Engine
from jaxllama.infer.sampling import Sampling

__all__ = ["Completion", "Engine", "Sampling"]
