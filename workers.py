"""Process management: serve until a stop signal, then drain; ``--workers`` processes.

``serve_until_signalled`` runs a gateway in this process until SIGTERM or
SIGINT and then drains it. ``run_workers`` forks processes that accept on one
listening socket, each with its own application (and so its own handle on the
shared disk store), restarts a worker that dies, passes stop signals on, and
makes each worker drain and exit if the parent itself disappears.
"""

import collections
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


def run_workers(server, count, make_application, shutdown_timeout):
    """Fork ``count`` processes that accept on the server's one listening
    socket, each serving its own ``make_application()``, and return the exit
    status. Restart a worker that dies, but give up (status 1) beyond
    RESTART_LIMIT: workers that cannot run must not be forked for ever. On a
    stop signal, close the
    listening socket here at once, pass SIGTERM on and wait for all to drain
    (status 1 if any cut requests off); a second signal kills them (status 1)."""
    workers = {}   # pid -> start time
    stopping = False
    status = 0
    parent = os.getpid()

    def start_worker():
        block_stop_signals()   # no signal between fork and the worker's own handlers
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                handle_stop_signals(signal.SIG_DFL)   # not the parent's handler
                threading.Thread(target=_stop_when_orphaned, args=(parent,), daemon=True).start()
                code = serve_application(server, make_application(), shutdown_timeout,
                                         second_signal_stops=False)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        workers[pid] = time.monotonic()
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
    for _ in range(count):
        start_worker()
    restarts = collections.deque()   # when recent restarts happened
    while workers:
        pid, wait_status = os.wait()
        started = workers.pop(pid, None)
        if started is None:
            continue
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
            start_worker()
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
