"""Process management: serve until a stop signal, then drain; ``--workers`` processes.

``serve_until_signalled`` runs a gateway in this process until SIGTERM or
SIGINT and then drains it. ``run_workers`` forks processes that accept on one
listening socket, each with its own application (and so its own handle on the
shared disk store), restarts a worker that dies, passes stop signals on, and
makes each worker drain and exit if the parent itself disappears.
"""

import collections
import math
import os
import signal
import threading
import time
import traceback

import gateway

# SIGHUP (a closed terminal, or a supervisor's reload) drains too, where it exists.
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT} | ({signal.SIGHUP} if hasattr(signal, "SIGHUP") else set())
FAST_CRASH_SECONDS = 1.0   # a worker dying sooner is restarted only after this pause
RESTART_LIMIT = (5, 10.0)   # more than 5 restarts within 10 s: give up (as systemd's start limit)


def usable_cpus(proc_cgroup="/proc/self/cgroup", cgroup_root="/sys/fs/cgroup"):
    """How many CPUs this process may use (``--workers auto``): those of its
    affinity mask (all, where there is none), fewer where its cgroups' CPU
    quota (a container's ``--cpus``) allows less, rounded up; at least one."""
    if hasattr(os, "sched_getaffinity"):
        cpus = len(os.sched_getaffinity(0))
    else:
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(proc_cgroup, cgroup_root)
    return max(1, min(cpus, math.ceil(quota)) if quota is not None else cpus)


def cgroup_cpu_quota(proc_cgroup, cgroup_root):
    """The CPUs' worth of time this process's cgroups allow it (quota over
    period, the least along its cgroup's path and those above it), or None
    without a quota: cgroup v2's ``cpu.max``, v1's ``cpu.cfs_quota_us`` and
    ``cpu.cfs_period_us``. In a container the path it is given may not be
    under its mount: the cgroups that are, up to the mount's root, count."""
    try:
        with open(proc_cgroup, errors="replace") as memberships:
            lines = memberships.read().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        if line.count(":") < 2:
            continue   # not "id:controllers:path": nothing to read there
        _, controllers, path = line.split(":", 2)
        if controllers == "":   # v2: one hierarchy, mounted at the root
            directory, read = cgroup_root, _cpu_max
        elif "cpu" in controllers.split(","):
            directory, read = os.path.join(cgroup_root, controllers), _cfs_quota
        else:
            continue
        names = [name for name in path.split("/") if name]
        for depth in range(len(names), -1, -1):
            quota = read(os.path.join(directory, *names[:depth]))
            if quota is not None:
                quotas.append(quota)
    return min(quotas) if quotas else None


def _cpu_max(directory):
    """A v2 cgroup's quota in CPUs, from ``cpu.max`` ("max 100000": none)."""
    fields = _read_fields(os.path.join(directory, "cpu.max"))
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _ratio(fields[0], fields[1])


def _cfs_quota(directory):
    """A v1 cgroup's quota in CPUs, from ``cpu.cfs_quota_us`` (-1: none)."""
    quota = _read_fields(os.path.join(directory, "cpu.cfs_quota_us"))
    period = _read_fields(os.path.join(directory, "cpu.cfs_period_us"))
    if len(quota) != 1 or len(period) != 1:
        return None
    return _ratio(quota[0], period[0])


def _ratio(quota, period):
    """``quota / period`` if both are positive whole numbers, else None."""
    if not (quota.isascii() and quota.isdigit() and period.isascii() and period.isdigit()) or (
            int(quota) == 0 or int(period) == 0):
        return None
    return int(quota) / int(period)


def _read_fields(path):
    try:
        with open(path, errors="replace") as file:
            return file.read().split()
    except (OSError, ValueError):   # ValueError: a NUL in a path made of a cgroup's name
        return []


def block_stop_signals(block=True):
    """Hold stop signals back until their handlers are set (see ``serve_until_signalled``):
    a SIGTERM that arrives just after the start-up line must still stop the server cleanly.
    ``block=False`` lets them through again. (Windows has no signal masks: a no-op there.)"""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK if block else signal.SIG_UNBLOCK, STOP_SIGNALS)


def handle_stop_signals(handler):
    """Install ``handler`` for the stop signals this process was not started
    ignoring: under ``nohup`` SIGHUP stays ignored, as does SIGINT in a shell's
    background job."""
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, handler)


def serve_until_signalled(server, shutdown_timeout, second_signal_stops=True):
    """Serve until a stop signal; then stop accepting, close idle connections
    and give in-flight requests ``shutdown_timeout`` seconds. A second stop
    signal ends the process at once, with status 1, if ``second_signal_stops``
    (a worker gets the same signal twice when a terminal or systemd signals
    its whole process group and its parent passes it on: it only drains).
    Returns how many requests were cut off at the deadline."""
    stopping = threading.Event()

    def stop(signum, frame):
        if stopping.is_set():
            if second_signal_stops:
                _exit_now("signal %d during the drain: stopping at once" % signum)
            return
        stopping.set()
        # Not on this thread: shutdown() waits for serve_forever() to return,
        # and the log's locks may be held by this very thread (see logs.py).
        threading.Thread(target=stop_serving, args=(signum,), daemon=True).start()

    def stop_serving(signum):
        server.log.log("info", "signal %d: draining and stopping" % signum)
        server.shutdown()

    handle_stop_signals(stop)
    block_stop_signals(False)
    server.serve_forever(gateway.POLL_INTERVAL)
    server.stop_accepting()
    left = server.drain(shutdown_timeout)
    if left:
        server.log.log("warning", "stopping with %d requests unfinished after %ss"
                       % (left, shutdown_timeout))
    return left


def serve_application(server, application, shutdown_timeout, second_signal_stops=True):
    """Serve ``application`` until signalled, then close it; the exit status:
    0, or 1 if requests were cut off at the shutdown deadline."""
    server.application, server.metrics = application, application.metrics
    try:
        return 1 if serve_until_signalled(server, shutdown_timeout, second_signal_stops) else 0
    finally:
        application.close()


def run_workers(server, count, make_application, shutdown_timeout, worker_exited=None):
    """Fork ``count`` processes that accept on the server's one listening
    socket, each serving its own ``make_application(slot)`` (``slot``: 0 to
    ``count - 1``, which a restarted worker takes over from the one that
    died; ``worker_exited(slot)`` is called once a worker is reaped), and
    return the exit status. Restart a worker that dies, but give up (status 1) beyond
    RESTART_LIMIT: workers that cannot run must not be forked for ever. On a
    stop signal, close the
    listening socket here at once, pass SIGTERM on and wait for all to drain
    (status 1 if any cut requests off); a second signal kills them (status 1)."""
    workers = {}   # pid -> (start time, slot)
    stopping = False
    status = 0
    parent = os.getpid()

    def start_worker(slot):
        block_stop_signals()   # no signal between fork and the worker's own handlers
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                handle_stop_signals(signal.SIG_DFL)   # not the parent's handler
                threading.Thread(target=_stop_when_orphaned, args=(parent,), daemon=True).start()
                code = serve_application(server, make_application(slot), shutdown_timeout,
                                         second_signal_stops=False)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        workers[pid] = (time.monotonic(), slot)
        block_stop_signals(False)

    def stop(signum, frame):
        nonlocal stopping, status
        if stopping and signum is not None:   # a second signal: stop at once
            status = 1
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            return
        stopping = True
        server.socket.close()   # this copy at once; each worker closes its own as it stops
        for pid in workers:
            os.kill(pid, signal.SIGTERM)

    handle_stop_signals(stop)
    # Every worker wakes for each new connection and only one wins it; the
    # others must get EAGAIN from accept() (which socketserver ignores), not
    # block there, deaf to shutdown, until the next connection.
    server.socket.setblocking(False)
    for slot in range(count):
        start_worker(slot)
    restarts = collections.deque()   # when recent restarts happened
    while workers:
        pid, wait_status = os.wait()
        if pid not in workers:
            continue
        started, slot = workers.pop(pid)
        if worker_exited is not None:
            worker_exited(slot)
        if stopping:
            status = status or (1 if wait_status else 0)
            continue
        server.log.log("warning", "worker %d exited (wait status %d); starting another"
                       % (pid, wait_status))
        now = time.monotonic()
        if now - started < FAST_CRASH_SECONDS:
            time.sleep(FAST_CRASH_SECONDS)   # one dying at once would fork in a tight loop
        while restarts and now - restarts[0] > RESTART_LIMIT[1]:
            restarts.popleft()
        if len(restarts) >= RESTART_LIMIT[0]:
            server.log.log("error", "workers keep dying (%d restarts within %gs); giving up"
                           % (len(restarts), RESTART_LIMIT[1]))
            stop(None, None)
            status = 1
        elif not stopping:
            restarts.append(now)
            start_worker(slot)
    server.server_close()
    return status


def _exit_now(message):
    """End the process at once from a signal handler (no locks: a raw write)."""
    os.write(2, ("data storage service: %s\n" % message).encode())
    os._exit(1)


def _stop_when_orphaned(parent, interval=0.5):
    """In a worker: drain and exit, as on SIGTERM, once the parent is gone
    (killed with SIGKILL, say), instead of serving on unsupervised."""
    while os.getppid() == parent:
        time.sleep(interval)
    os.kill(os.getpid(), signal.SIGTERM)
