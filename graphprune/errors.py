"""Error types: user errors print one line and exit 2; verification failures exit 1."""


class UserError(Exception):
    """Bad input or an impossible request. The CLI prints the message alone and exits 2."""

    exit_code = 2


class VerificationError(Exception):
    """A pruned model does not match its masked original. The CLI exits 1."""

    exit_code = 1
