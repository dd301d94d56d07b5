"""The one exception type for mistakes in what the user gave us.

Scripts catch `UserInputError` at the top (see `training.cli`) and print its message as
one line, so each message must name the problem and the fix.
"""


class UserInputError(ValueError):
    """Bad input from the user: a missing file, a bad flag value, an incompatible checkpoint."""
