"""Start one container of the process node: mount its volumes, then exec its command.

FAKE container runtime. The process node starts this under `unshare --mount`, so the bind mounts
below exist only in this container's private mount namespace: each volume shows up at its real
`mountPath` (e.g. /var/run/secrets/kubernetes.io/serviceaccount), as in a container, while the
rest of the file system is the host's. Argument: a JSON file written by process_node.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Exit code and marker when the command cannot be started, like a runtime's StartError.
START_ERROR_EXIT = 128


def _mount_point(source: Path, target: Path) -> None:
    """Bind mounts need an existing target of the same kind (file or directory)."""
    if source.is_dir():
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.touch()


def _bind(source: str, target: str, read_only: bool) -> None:
    _mount_point(Path(source), Path(target))
    subprocess.run(["mount", "--bind", source, target], check=True)
    if read_only:
        subprocess.run(["mount", "-o", "remount,bind,ro", target], check=True)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    termination_log = spec["terminationLog"]
    try:
        for mount in spec["mounts"]:
            _bind(mount["source"], mount["target"], mount["readOnly"])
        os.chdir(spec["workingDir"])
    except (OSError, subprocess.CalledProcessError) as err:
        Path(termination_log).write_text(f"failed to set up container: {err}")
        Path(spec["startErrorMarker"]).touch()
        sys.exit(START_ERROR_EXIT)
    argv: list[str] = spec["argv"]
    try:
        os.execvpe(argv[0], argv, spec["env"])
    except OSError as err:
        Path(termination_log).write_text(
            f'failed to start container: exec: "{argv[0]}": {err.strerror}'
        )
        Path(spec["startErrorMarker"]).touch()
        sys.exit(START_ERROR_EXIT)


if __name__ == "__main__":
    main()
