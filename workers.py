"""Process management: serve until a stop signal, then drain; ``--workers`` processes.

``serve_until_signalled`` runs a gateway in this process until SIGTERM or
SIGINT and then drains it. ``run_workers`` forks processes that accept on one
listening socket, each with its own application (and so its own handle on the
shared disk store), restarts a worker that dies, passes stop signals on, and
makes each worker drain and exit if the parent itself disappears.
"""

import os
import signal
import threading
import time
import traceback

import gateway

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def block_stop_signals(block=True):
    """Hold stop signals back until their handlers are set (see ``serve_until_signalled``):
    a SIGTERM that arrives just after the start-up line must still stop the server cleanly.
    ``block=False`` lets them through again. (Windows has no signal masks: a no-op there.)"""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK if block else signal.SIG_UNBLOCK, STOP_SIGNALS)


def serve_until_signalled(server, shutdown_timeout):
    """Serve until SIGTERM or SIGINT; then stop accepting, close idle
    connections and give in-flight requests ``shutdown_timeout`` seconds."""
    def stop(signum, frame):
        # Not on this thread: shutdown() waits for serve_forever() to return,
        # and the log's locks may be held by this very thread (see logs.py).
        threading.Thread(target=stop_serving, args=(signum,), daemon=True).start()

    def stop_serving(signum):
        server.log.log("info", "signal %d: draining and stopping" % signum)
        server.shutdown()

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)
    block_stop_signals(False)
    server.serve_forever(gateway.POLL_INTERVAL)
    server.stop_accepting()
    left = server.drain(shutdown_timeout)
    if left:
        server.log.log("warning", "stopping with %d requests unfinished after %ss"
                       % (left, shutdown_timeout))


def serve_application(server, make_application, shutdown_timeout):
    """Give ``server`` a new application from ``make_application()``, serve it
    until signalled, then close it."""
    application = make_application()
    server.application, server.metrics = application, application.metrics
    try:
        serve_until_signalled(server, shutdown_timeout)
    finally:
        application.close()


def run_workers(server, count, make_application, shutdown_timeout):
    """Fork ``count`` processes that accept on the server's one listening
    socket, each serving its own ``make_application()``. Restart a worker that
    dies; on SIGTERM or SIGINT, pass SIGTERM on and wait for all to drain."""
    workers = {}   # pid -> start time
    stopping = False
    parent = os.getpid()

    def start_worker():
        block_stop_signals()   # no signal between fork and the worker's own handlers
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                for signum in STOP_SIGNALS:
                    signal.signal(signum, signal.SIG_DFL)
                threading.Thread(target=_stop_when_orphaned, args=(parent,), daemon=True).start()
                serve_application(server, make_application, shutdown_timeout)
                status = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        workers[pid] = time.monotonic()
        block_stop_signals(False)

    def stop(signum, frame):
        nonlocal stopping
        stopping = True
        for pid in workers:
            os.kill(pid, signal.SIGTERM)

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)
    # Every worker wakes for each new connection and only one wins it; the
    # others must get EAGAIN from accept() (which socketserver ignores), not
    # block there, deaf to shutdown, until the next connection.
    server.socket.setblocking(False)
    for _ in range(count):
        start_worker()
    while workers:
        pid, status = os.wait()
        started = workers.pop(pid, None)
        if started is None or stopping:
            continue
        server.log.log("warning", "worker %d exited (wait status %d); starting another"
                       % (pid, status))
        if time.monotonic() - started < 1:
            time.sleep(1)   # a worker that dies at once would otherwise fork in a tight loop
        if not stopping:
            start_worker()
    server.server_close()


def _stop_when_orphaned(parent, interval=0.5):
    """In a worker: drain and exit, as on SIGTERM, once the parent is gone
    (killed with SIGKILL, say), instead of serving on unsupervised."""
    while os.getppid() == parent:
        time.sleep(interval)
    os.kill(os.getpid(), signal.SIGTERM)
