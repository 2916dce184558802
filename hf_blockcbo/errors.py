"""User-facing errors: one class, so the CLI can print them as one clear line and exit non-zero."""


class BlockCBOError(ValueError):
    """An input or state the user can fix; the message says how."""
