"""The two exception types a script turns into one line (see `training.cli`).

Each message must name the problem and the fix.
"""


class UserInputError(ValueError):
    """Bad input from the user: a missing file, a bad flag value, an incompatible checkpoint (exit status 2)."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. persistent non-finite losses); the message says why and what to do (exit 1)."""
