"""Stable exit codes of `rbees` (documented in docs/fleet.md beside rbees-pool's).

A remote rbees-pool's exit code passes through unchanged (0-11 and 20 on, see rbees_pool/exitcodes.py), so the
codes that only `rbees` produces, 12-19, are numbers rbees-pool never uses. Never renumber, only append.
"""

from __future__ import annotations

from enum import IntEnum

from rbees_pool.exitcodes import ExitCode as PoolExitCode


class ExitCode(IntEnum):
    """Process exit status of `rbees`; 0-11 and 20 on are rbees-pool's (passed through from the host)."""

    OK = PoolExitCode.OK
    FAILURE = PoolExitCode.FAILURE
    USAGE = PoolExitCode.USAGE  # bad arguments, an invalid hosts.toml or ssh config entry
    UNKNOWN_HOST = 12  # not in hosts.toml, not an ssh-config alias, and DNS cannot resolve it
    UNREACHABLE = 13  # connection refused or timed out, SSH handshake failed, a ProxyJump hop failed
    AUTH_FAILED = 14  # the SSH server (or a worker/orchestrator) refused our credentials
    HOST_KEY_UNKNOWN = 15  # not in known_hosts; check it, then rerun with --accept-new-host-key
    HOST_KEY_CHANGED = 16  # known_hosts holds another key for this host: always refused
    REMOTE_LOST = 17  # no exit status came back (connection dropped, command killed); a worker died mid-job
    HOSTS_FAILED = 18  # several hosts ran and at least one failed (the summary says which, with its code)
    JOB_FAILED = 19  # `rbees infer`: the server refused the job or ended it with an error
    INTERRUPTED = PoolExitCode.INTERRUPTED  # Ctrl-C (128 + SIGINT); `infer` cancelled the job first
