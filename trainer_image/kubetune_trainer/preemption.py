"""SIGTERM handling for the whole run (no torch here: installed before anything heavy loads)."""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from kubetune_trainer.errors import Preempted

log = logging.getLogger(__name__)


class SigtermFlag:
    """SIGTERM (suspend, preemption, node drain, `kubectl delete pod`) from the first moment of
    the run, installed before the config is even read:

    - outside the training loop it raises Preempted at once: before training there is nothing
      to save (setup starts over quickly), and evaluation and publishing resume from the final
      checkpoint, so the pod exits well inside its grace period instead of being killed;
    - inside the loop (`deferred()`) it only sets a flag, checked at every optimizer-step
      boundary, where the loop saves a checkpoint and raises Preempted itself. A flag still set
      when the loop ends (SIGTERM during the final checkpoint) raises then.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._previous: Any = None
        self._previous_wakeup_fd = -1
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._installed = False
        self._deferring = False

    def install(self) -> None:
        if self._installed:
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: SIGTERM will not checkpoint")
            return
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._redeliver_to_the_main_thread()
        self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            if self._wakeup is not None:
                signal.set_wakeup_fd(self._previous_wakeup_fd)
                for sock in self._wakeup:
                    sock.close()  # ends the redelivering thread
                self._wakeup = None
            self._installed = False

    def _redeliver_to_the_main_thread(self) -> None:
        """Python runs signal handlers in the main thread only, and only wakes it from a
        blocking wait when the kernel delivered the signal to it. The kernel picks another
        thread when the main one has signals blocked at that instant (glibc blocks them while
        creating a thread, as a download pool does on every fetch): the handler would then
        wait for the main thread's wait to end, forever with a stalled download. The C-level
        handler reports every signal on the wakeup fd, whichever thread got it; this thread
        sends SIGTERM to the main thread itself until the handler has run."""
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._wakeup = (reader, writer)
        self._previous_wakeup_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        main = threading.main_thread().ident
        assert main is not None

        def redeliver() -> None:
            while True:
                try:
                    received = reader.recv(64)
                except OSError:
                    return
                if not received:
                    return
                if signal.SIGTERM in received and not self._event.is_set():
                    signal.pthread_kill(main, signal.SIGTERM)

        threading.Thread(target=redeliver, name="kubetune-sigterm", daemon=True).start()

    @contextmanager
    def deferred(self, step: Callable[[], int | None]) -> Iterator[None]:
        """Only set the flag while the block runs; `step` says which step a late SIGTERM
        found the run at."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self.is_set():
            raise Preempted(step())

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._event.is_set():  # a redelivered or repeated SIGTERM: already acted on
            return
        self._event.set()
        if not self._deferring:
            raise Preempted(None)
        # Deferred: only the flag. Anything else here could run in the middle of a CUDA call.

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()
