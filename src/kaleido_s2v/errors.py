"""The one exception type for bad user input, and the value checks every front end shares.

Raise `UserInputError` with one line that names the input and says how to fix it. The CLI prints it
as `kaleido-s2v <command>: error: <message>` and exits with code 2; library users get a `ValueError`.
"""

import math

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64 - 1


class UserInputError(ValueError):
    """Bad input from the user (a file, a flag, a folder): the message names it and the fix."""


def check_seed(seed, where: str = "--seed") -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise UserInputError(f"{where} {seed!r}: give an integer from 0 to 2**64 - 1")
    return seed


def check_at_least(value, flag: str, minimum: float = 1, hint: str = ""):
    """`value` (None: not given) must be finite and >= minimum; 0 is refused like any other out-of-range value."""
    if value is not None and not (math.isfinite(value) and value >= minimum):
        raise UserInputError(f"{flag} {value}: must be at least {minimum}{f' ({hint})' if hint else ''}")
    return value


def check_text(text: str | None, what: str) -> None:
    """Text goes into the tokenizer and the JSON sidecar: it must be valid Unicode (argv may carry raw bytes)."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserInputError(f"{what} is not valid UTF-8 text: write it in UTF-8") from None
