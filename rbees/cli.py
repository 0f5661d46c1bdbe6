"""Console entry point; the commands of this program are not built yet (see the SPEC)."""

from __future__ import annotations

import sys


def main() -> None:
    print("rbees: not available in this version yet; use rbees-pool and rbees-workerd", file=sys.stderr)
    sys.exit(1)
