"""The one exception the CLIs turn into a single clear line (no traceback)."""


class UserError(ValueError):
    """Bad input from the user: unknown config or net, missing data, wrong checkpoint, too-small image.

    `train.py` and `evaluate.py` catch it and print `error: <message>` with a non-zero exit, so every
    message must name what was wrong and what is allowed.
    """
