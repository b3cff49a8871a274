"""Error types: user errors print one line and exit 2; verification failures exit 1."""


class UserError(Exception):
    """Bad input or an impossible request. The CLI prints the message alone and exits 2."""

    exit_code = 2


class VerificationError(Exception):
    """A pruned model does not match its masked original. The CLI exits 1."""

    exit_code = 1


class WorkersFailed(Exception):
    """A ``--workers`` process exited with a UserError / VerificationError whose message did not come
    back (distributed.launch raises the message itself when it does); the CLI exits with the same code."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(f"a worker process failed (exit code {exit_code})")
        self.exit_code = exit_code
