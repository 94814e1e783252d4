"""The base class of every error this package raises on purpose.

Each error also keeps its builtin base (``ValueError``, ``RuntimeError``, ...), so callers that
catch the builtin still work; ``except RepaEFastError`` catches all of them, e.g. for an entry
point that turns them into one line and exit code 2.
"""


class RepaEFastError(Exception):
    """A problem the package detected and explained in the message (bad config, data,
    checkpoint, run folder, ...): print the message, no traceback needed."""
