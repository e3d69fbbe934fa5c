"""The input pipeline: the only package that imports TensorFlow (see the README's module map)."""

import os

# TensorFlow only reads, shuffles and tokenizes here (no matmuls), so its oneDNN kernels buy nothing, and
# with them on it prints an unsilenceable notice at import. Set before any module here imports TensorFlow.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
