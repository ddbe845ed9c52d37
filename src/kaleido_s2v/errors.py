"""The one exception type for bad user input.

Raise `UserInputError` with one line that names the input and says how to fix it. The CLI prints it
as `kaleido-s2v <command>: error: <message>` and exits with code 2; library users get a `ValueError`.
"""


class UserInputError(ValueError):
    """Bad input from the user (a file, a flag, a folder): the message names it and the fix."""
