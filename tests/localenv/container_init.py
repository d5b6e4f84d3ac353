"""Start one container of the process node: mount its volumes, then exec its command.

FAKE container runtime. The process node starts this under `unshare --mount`, so the bind mounts
below exist only in this container's private mount namespace: each volume shows up at its real
`mountPath` (e.g. /var/run/secrets/kubernetes.io/serviceaccount), as in a container, while the
rest of the file system is the host's. Argument: a JSON file written by process_node.py.

A volume mounted over a directory that holds the repository (an emptyDir at /tmp while the
checkout lives under /tmp) would hide the virtualenv and the other volumes' sources. So every
source is opened before the first mount and mounted through /proc/self/fd, and the repository is
bound back at its own path afterwards when a mount hid it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Exit code when the command cannot be started, like a runtime's StartError.
START_ERROR_EXIT = 128


def _bind(fd: int, target: str, is_dir: bool, read_only: bool) -> None:
    """Bind the file or directory open as `fd` onto `target` (created if missing)."""
    path = Path(target)
    if is_dir:
        path.mkdir(parents=True, exist_ok=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.touch()
    source = f"/proc/self/fd/{fd}"
    # --no-canonicalize: mount(8) would otherwise resolve the magic link back to a path string,
    # which may be the hidden one.
    subprocess.run(
        ["mount", "--no-canonicalize", "--bind", source, target], check=True, pass_fds=(fd,)
    )
    if read_only:
        subprocess.run(["mount", "-o", "remount,bind,ro", target], check=True)


def _same(fd: int, path: str) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    # Opened before any mount can hide them.
    termination = os.open(spec["terminationLog"], os.O_WRONLY)
    marker_dir = os.open(str(Path(spec["startErrorMarker"]).parent), os.O_RDONLY)
    marker_name = Path(spec["startErrorMarker"]).name
    mounts = [(os.open(m["source"], os.O_PATH), m) for m in spec["mounts"]]
    host_paths = [(os.open(p, os.O_PATH), p) for p in spec.get("hostPaths", [])]
    working_dir = spec["workingDir"]
    if not spec.get("workingDirIsExplicit"):
        os.chdir(working_dir)  # the default (pod home on the host) may be hidden by a mount

    def fail(message: str) -> None:
        os.write(termination, message.encode())
        os.close(os.open(marker_name, os.O_CREAT | os.O_WRONLY, dir_fd=marker_dir))
        sys.exit(START_ERROR_EXIT)

    try:
        for fd, mount in mounts:
            _bind(fd, mount["target"], Path(f"/proc/self/fd/{fd}").is_dir(), mount["readOnly"])
        for fd, path in host_paths:
            if not _same(fd, path):
                _bind(fd, path, True, False)
        if spec.get("workingDirIsExplicit"):
            os.chdir(working_dir)
    except (OSError, subprocess.CalledProcessError) as err:
        fail(f"failed to set up container: {err}")
    argv: list[str] = spec["argv"]
    try:
        os.execvpe(argv[0], argv, spec["env"])
    except OSError as err:
        fail(f'failed to start container: exec: "{argv[0]}": {err.strerror}')


if __name__ == "__main__":
    main()
