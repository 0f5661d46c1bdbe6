"""One exception hierarchy for `rbees`: each error has a stable `code` (in its one-line message) and exit code."""

from __future__ import annotations

from rbees.exitcodes import ExitCode


class RbeesError(Exception):
    """Base of every failure `rbees` reports; the CLI prints `error: CODE: message` and exits with `exit_code`."""

    code = "FAILURE"
    exit_code = ExitCode.FAILURE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidArgument(RbeesError):
    code = "INVALID_ARGUMENT"
    exit_code = ExitCode.USAGE


class InvalidHostsFile(RbeesError):
    code = "INVALID_HOSTS_FILE"
    exit_code = ExitCode.USAGE


class UnknownHost(RbeesError):
    code = "UNKNOWN_HOST"
    exit_code = ExitCode.UNKNOWN_HOST


class Unreachable(RbeesError):
    code = "UNREACHABLE"
    exit_code = ExitCode.UNREACHABLE


class AuthFailed(RbeesError):
    code = "AUTH_FAILED"
    exit_code = ExitCode.AUTH_FAILED


class HostKeyUnknown(RbeesError):
    code = "HOST_KEY_UNKNOWN"
    exit_code = ExitCode.HOST_KEY_UNKNOWN


class HostKeyChanged(RbeesError):
    code = "HOST_KEY_CHANGED"
    exit_code = ExitCode.HOST_KEY_CHANGED


class RemoteLost(RbeesError):
    code = "REMOTE_LOST"
    exit_code = ExitCode.REMOTE_LOST


class JobFailed(RbeesError):
    code = "JOB_FAILED"
    exit_code = ExitCode.JOB_FAILED


class Interrupted(RbeesError):
    code = "INTERRUPTED"
    exit_code = ExitCode.INTERRUPTED
