"""The one exception type for mistakes a user can fix; the CLI and app show its message alone."""


class UserError(Exception):
    """Bad input from a user: an unknown model, an empty corpus, an impossible setting."""
