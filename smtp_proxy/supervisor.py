"""Several processes serving the same listening sockets, under one supervising parent.

Every Python thread of a process shares one interpreter lock, so one process uses
at most one core. ``smtp.processes`` and ``api.processes`` run that many children
instead. The parent binds every listening socket, then forks the children, which
inherit them: the kernel hands each new connection to whichever child accepts it
first, and a child that dies leaves the socket, and the connections queued on it,
to the others.

The parent stays single-threaded and opens no database connection or Redis
client, so that every fork (the first ones and each restart) starts from a clean
process. It learns that a child serves, and that it drains, over a datagram
socket of its own that the child's ``NOTIFY_SOCKET`` names: the child speaks the
same sd_notify protocol it speaks to systemd when it runs alone
(``systemd.py``), and only the parent talks to the service manager. It forwards
SIGHUP (reload) and SIGTERM/SIGINT (drain, as SIGTERM) to every child, restarts a child that
dies (at once after a long life, then with a doubling delay while it keeps
dying young), and exits 0 once every child has drained. A second SIGTERM or
SIGINT during the drain is forwarded too (each child then stops at once) and the
parent exits 128 + its number. The children ignore SIGINT: Ctrl-C reaches the
whole process group, and they must count only the signals their parent forwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import secrets
import selectors
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from smtp_proxy import systemd

log = logging.getLogger("smtp_proxy.supervisor")

# A child that lived this long is restarted at once; one that died younger waits,
# from FIRST_DELAY doubling up to MAX_DELAY.
STABLE_SECONDS = 10.0
FIRST_DELAY = 0.5
MAX_DELAY = 30.0
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
PR_SET_PDEATHSIG = 1  # prctl option, from linux/prctl.h


@dataclass(frozen=True)
class Role:
    """What some of the children run: ``serve`` returns the child's exit code once it has drained.

    ``serve(replacement)`` runs in the child, after the fork; ``replacement`` is true for
    a child started in place of one that died (what the parent loaded at start may be
    stale by then). It must announce itself with ``systemd.ready()`` once it accepts,
    and handle SIGTERM and SIGHUP itself.
    """

    name: str
    count: int
    serve: Callable[[bool], int]


@dataclass
class _Slot:
    role: Role
    index: int
    pid: int = 0
    started: float = 0.0
    ready: bool = False
    failures: int = 0  # deaths in a row, each before STABLE_SECONDS
    restart_at: float | None = None
    died: bool = False  # a child in this slot ended before: the next one replaces it

    @property
    def label(self) -> str:
        return f"{self.role.name}/{self.index}"


class Supervisor:
    """Forks the children of every role and keeps them running until SIGTERM or SIGINT."""

    def __init__(
        self,
        roles: Sequence[Role],
        status: str,
        *,
        on_child_exit: Callable[[int], None] = lambda _pid: None,
        on_stop: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``status`` goes to the service manager with READY=1; ``on_child_exit(pid)`` runs in
        the parent for every child that ended (the metrics files of a dead child); ``on_stop``
        once SIGTERM or SIGINT has been forwarded (the parent's copies of the sockets)."""
        self.slots = [_Slot(role, index) for role in roles for index in range(role.count)]
        self.status = status
        self._on_child_exit = on_child_exit
        self._on_stop = on_stop
        self._clock = clock
        self._stopping = False
        self._exit_code = 0  # 128 + the second stop signal's number, once one came
        self._announced = False
        self._parent = os.getpid()
        self._notify_name = f"smtp-proxy-supervisor-{self._parent}-{secrets.token_hex(6)}"

    # --- parent --------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT and every child's drain; the exit code (0 on a clean stop)."""
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        notify.bind("\0" + self._notify_name)
        notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        notify.setblocking(False)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        previous = {signum: signal.signal(signum, _note_signal) for signum in _SIGNALS}
        previous_fd = signal.set_wakeup_fd(wake_w)
        selector = selectors.DefaultSelector()
        selector.register(notify, selectors.EVENT_READ, "notify")
        selector.register(wake_r, selectors.EVENT_READ, "signal")
        self._closing = (notify, wake_r, wake_w, selector)
        try:
            for slot in self.slots:
                self._spawn(slot)
            while not (self._stopping and not self._alive()):
                for key, _events in selector.select(self._timeout()):
                    if key.data == "notify":
                        self._read_notifications(notify)
                    else:
                        self._handle_signals(wake_r)
                self._reap()
                self._restart_due()
        finally:
            signal.set_wakeup_fd(previous_fd)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            selector.close()
            notify.close()
            os.close(wake_r)
            os.close(wake_w)
        log.info("all processes stopped", extra={"event": "supervisor.stopped"})
        return self._exit_code

    def _alive(self) -> list[_Slot]:
        return [slot for slot in self.slots if slot.pid]

    def _timeout(self) -> float | None:
        due = [slot.restart_at for slot in self.slots if slot.restart_at is not None and not self._stopping]
        return max(0.0, min(due) - self._clock()) if due else None

    def _handle_signals(self, wake_r: int) -> None:
        try:
            received = os.read(wake_r, 512)
        except BlockingIOError:
            return
        for signum in received:
            if signum == signal.SIGHUP:
                log.info("reload: forwarding SIGHUP", extra={"event": "supervisor.reload"})
                self._signal_all(signal.SIGHUP)
            elif signum in (signal.SIGTERM, signal.SIGINT) and not self._stopping:
                self._stopping = True
                systemd.stopping()
                log.info(
                    "draining every process",
                    extra={"event": "supervisor.draining", "processes": len(self._alive())},
                )
                for slot in self.slots:
                    slot.restart_at = None
                self._signal_all(signal.SIGTERM)
                self._on_stop()
            elif signum in (signal.SIGTERM, signal.SIGINT) and not self._exit_code:
                self._exit_code = 128 + signum
                log.warning(
                    f"second {signal.Signals(signum).name}: every process stops now, without waiting "
                    "for the drain",
                    extra={"event": "supervisor.stopping_now", "processes": len(self._alive())},
                )
                self._signal_all(signal.SIGTERM)

    def _signal_all(self, signum: int) -> None:
        for slot in self._alive():
            with contextlib.suppress(ProcessLookupError):  # ended a moment ago; reaped next
                os.kill(slot.pid, signum)

    def _read_notifications(self, notify: socket.socket) -> None:
        while True:
            try:
                data, ancillary, _flags, _address = notify.recvmsg(4096, socket.CMSG_SPACE(_CREDENTIALS.size))
            except BlockingIOError:
                return
            pid = next(
                (
                    _CREDENTIALS.unpack(payload[: _CREDENTIALS.size])[0]
                    for level, kind, payload in ancillary
                    if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
                ),
                0,
            )
            slot = next((s for s in self.slots if s.pid == pid and pid), None)
            if slot is None or b"READY=1" not in data.split(b"\n"):
                continue
            slot.ready = True
            log.info(
                "process serving",
                extra={"event": "supervisor.child_ready", "role": slot.label, "child_pid": pid},
            )
            if not self._announced and all(s.ready for s in self.slots):
                self._announced = True
                systemd.ready(self.status)
                log.info(
                    "every process serving",
                    extra={"event": "supervisor.ready", "processes": len(self.slots)},
                )

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            self._on_child_exit(pid)
            lived = self._clock() - slot.started
            slot.pid, slot.ready = 0, False
            code = os.waitstatus_to_exitcode(status)
            slot.died = True
            if self._stopping:
                log.info(
                    "process drained",
                    extra={
                        "event": "supervisor.child_stopped",
                        "role": slot.label,
                        "child_pid": pid,
                        "exit_code": code,
                    },
                )
                continue
            slot.failures = 0 if lived >= STABLE_SECONDS else slot.failures + 1
            delay = 0.0 if slot.failures == 0 else min(MAX_DELAY, FIRST_DELAY * 2 ** (slot.failures - 1))
            slot.restart_at = self._clock() + delay
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            log.error(
                f"process ended unexpectedly ({how}); restarting in {delay:g}s",
                extra={
                    "event": "supervisor.child_died",
                    "role": slot.label,
                    "child_pid": pid,
                    "exit_code": code,
                    "lived_seconds": round(lived, 3),
                    "restart_in_seconds": delay,
                },
            )

    def _restart_due(self) -> None:
        now = self._clock()
        for slot in self.slots:
            if slot.restart_at is not None and slot.restart_at <= now and not self._stopping:
                slot.restart_at = None
                self._spawn(slot)

    def _spawn(self, slot: _Slot) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's coverage is its role's
            os._exit(self._child(slot))
        slot.pid, slot.started, slot.ready = pid, self._clock(), False
        log.info(
            "process started",
            extra={"event": "supervisor.child_started", "role": slot.label, "child_pid": pid},
        )

    # --- child ---------------------------------------------------------------------------------

    def _child(self, slot: _Slot) -> int:
        """Runs in the new child: leave the parent's signal plumbing, then serve the role."""
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for signum in _SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            # Ctrl-C also reaches the parent, which forwards it as SIGTERM: counted once, not twice
            # (``lifecycle.StopSignals`` leaves a signal the process ignores ignored).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            # Until the role's config watcher takes SIGHUP over, a reload has nothing to reload
            # here yet; its default action would end the process.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            _drain_when_orphaned(self._parent)
            notify, wake_r, wake_w, selector = self._closing
            selector.close()
            notify.close()
            os.close(wake_r)
            os.close(wake_w)
            # Readiness goes to the parent, which speaks for every child to the service manager.
            os.environ["NOTIFY_SOCKET"] = "@" + self._notify_name
            code = slot.role.serve(slot.died)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:
            log.exception("process failed", extra={"event": "supervisor.child_failed", "role": slot.label})
        finally:
            _flush_logs()
        return code


def _drain_when_orphaned(parent: int) -> None:
    """Ask the kernel for SIGTERM when the parent dies (killed outside systemd, which would
    stop the whole unit): the child then drains and exits instead of serving unsupervised."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _note_signal(_signum: int, _frame: object) -> None:
    """The wakeup fd carries the signal number to the loop; nothing to do here."""


def _flush_logs() -> None:
    from smtp_proxy.logs import stop_background_writer

    stop_background_writer()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError) as error:
            if getattr(error, "errno", None) not in (errno.EPIPE, None):
                raise
