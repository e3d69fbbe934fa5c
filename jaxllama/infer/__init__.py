"""Inference: the batched KV-cache engine, sampling, chat templates, and the generate/eval drivers."""
