"""Remove a ``gateway triton-local`` server's leftovers once its launcher is gone.

Run by the launcher as ``python -m gateway.triton_local.janitor DIR`` with the read end
of a pipe on stdin, the launcher keeping the write end. The janitor detaches (forks, so
it is no longer in the launcher's process tree: a test or a supervisor that kills the
launcher's whole tree leaves it alive), then reads stdin. The launcher writes there the
names of its stubs' shared-memory regions (one a line), so that they can be unlinked
even if the stubs are killed before the janitor looks. The read ends at EOF, which the
kernel delivers when the launcher's last copy of the write end closes: at a normal
exit, and also when the launcher is SIGKILLed, which no code in the launcher can see.
Then it calls :func:`sweep`, the same clean-up the launcher runs itself at a normal
exit (see the server module's docstring for why this design).

Standard library only: it starts next to every local Triton and must start fast.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path

# The Python backend names each stub's shared-memory region like this (the stub's second
# argument); only names of this shape are ever unlinked.
_SHM_REGION = re.compile(rb"triton_python_backend_shm_region_[0-9a-fA-F-]+")
# A SIGKILLed process leaves /proc's cmdline at once; stubs and tritonserver were gone
# within 0.2 s in our runs. The bound only keeps a stuck janitor from living for ever.
SWEEP_TIMEOUT_S = 10.0


def server_processes(root: Path) -> dict[int, list[bytes]]:
    """Live processes of the server whose temporary folder is ``root``: {pid: argv}.

    tritonserver is told ``--model-repository=ROOT/models``; each Python-backend stub runs
    the binary ``ROOT/backends/python/triton_python_backend_stub``. Nothing else names
    ``root`` that way. A zombie has an empty cmdline and is not counted: it holds no
    port and no file.
    """
    prefix = os.fsencode(str(root)) + b"/"
    found: dict[int, list[bytes]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        argv = _argv(int(entry.name))
        if argv and (
            argv[0].startswith(prefix)
            or any(a.startswith(b"--model-repository=" + prefix) for a in argv[1:])
        ):
            found[int(entry.name)] = argv
    return found


def _argv(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:  # gone meanwhile, or not ours to read
        return None


def _kill(pid: int, argv: list[bytes]) -> None:
    # Through a pidfd, checking the cmdline again once it is open: a pid freed and
    # reused since the scan is then never signalled.
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if _argv(pid) == argv:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(fd)


def shm_regions(procs: dict[int, list[bytes]]) -> set[bytes]:
    """The shared-memory region names in the stubs' command lines (their second argument)."""
    return {a for argv in procs.values() for a in argv[1:3] if _SHM_REGION.fullmatch(a)}


def sweep(root: Path, regions: Iterable[bytes] = (), timeout: float = SWEEP_TIMEOUT_S) -> bool:
    """SIGKILL the server's processes left under ``root``, free their shared memory,
    remove ``root``. Idempotent. Return whether every process was gone in time.

    ``regions``: region names learnt earlier, of stubs that may be dead by now.

    The stubs would exit by themselves once tritonserver is reaped (they poll their
    parent every 300 ms), but only once something reaps it: a container's pid 1 may
    never do so, and took about 2 s here. SIGKILL makes the end the same either way;
    a SIGKILLed stub cannot unlink its shared-memory region, so that is done here.
    """
    regions = {r for r in regions if _SHM_REGION.fullmatch(r)}
    deadline = time.monotonic() + timeout
    while procs := server_processes(root):
        regions |= shm_regions(procs)
        for pid, argv in procs.items():
            _kill(pid, argv)
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    for region in regions:
        try:
            os.unlink(b"/dev/shm/" + region)
        except FileNotFoundError:
            pass
    shutil.rmtree(root, ignore_errors=True)
    return not procs


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m gateway.triton_local.janitor DIR  (stdin: the launcher's pipe)")
        return 2
    root = Path(argv[1])
    if os.fork():  # leave the launcher's process tree (see the module docstring)
        os._exit(0)
    # The loop ends at EOF: the launcher exited or was killed.
    regions = {line.strip() for line in sys.stdin.buffer}
    if not sweep(root, regions):
        print(f"triton-local janitor: processes under {root} outlived SIGKILL", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
