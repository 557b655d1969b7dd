"""The one exception type for bad user input (arguments, files, data).

Raised at the boundary with a message that says what is wrong and how to fix it; the CLI prints it
and exits with status 2, never a traceback.
"""


class UserError(ValueError):
    """Bad input from the user: a wrong argument, an unreadable or malformed file, unusable data."""
