"""The two exception types jaxllama raises for problems a user can fix.

The CLI prints either as one line (no traceback unless ``--debug``) and exits 2 for
:class:`ConfigError` (bad usage or configuration) and 1 for :class:`RunError`.
"""


class JaxllamaError(Exception):
    """Base class: a problem described in one readable line."""

    exit_code = 1


class ConfigError(JaxllamaError):
    """Bad user input: a config key, value, file or command-line argument."""

    exit_code = 2


class RunError(JaxllamaError):
    """A failure while running (diverged loss, missing device, ...)."""

    exit_code = 1


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception from a library, for our one-line messages: cut before TensorStore's
    spec dumps (``See full TensorStore details: ...``) and at ``limit`` characters."""
    lines = str(e).strip().splitlines()
    text = (lines[0] if lines else type(e).__name__).split(" See full TensorStore details")[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."
