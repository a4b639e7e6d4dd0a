"""The inference worker process: the only place onnxruntime is imported.

Started by `WorkerEngine` as `python -m agent.inference.worker`, it speaks
frames (frames.py) on stdin/stdout. It limits its own address space
(RLIMIT_AS) before importing anything large, verifies each model file's
sha256 and size from the bytes it reads before creating a session, caches
sessions per digest, turns thread spinning off, and answers every request
with outputs or a typed failure. A model that crashes the runtime or blows
the memory limit kills only this process; the daemon sees the pipe close.

Replies are written by a thread of their own, in order: a reply larger than the
pipe (PP-OCR's 1.06 MB against 1 MiB) would otherwise hold the next job, already
waiting on stdin, until the daemon had read the end of this one. onnxruntime
releases the GIL while it computes, so the two overlap.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import queue
import resource
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, BinaryIO

from agent.inference import frames


def _limit_memory(megabytes: int) -> None:
    if megabytes > 0:
        limit = megabytes * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _reply(out: BinaryIO, header: dict[str, Any], buffers: list[Any] | None = None) -> None:
    out.writelines(frames.encode(header, buffers or []))
    out.flush()


CPU = "CPUExecutionProvider"


def choose_providers(wanted: Sequence[str], available: Sequence[str]) -> list[str]:
    """The execution providers to ask onnxruntime for: those the config wants, in its order,
    that this onnxruntime build has, and the CPU last as the fallback it always has."""
    chosen = [name for name in wanted if name in available and name != CPU]
    return [*chosen, CPU]


class Runtime:
    def __init__(self, threads: int, providers: Sequence[str] = (CPU,)) -> None:
        import onnxruntime as ort

        self._ort = ort
        self._threads = threads
        self._sessions: dict[str, Any] = {}
        self.available = list(ort.get_available_providers())
        self.providers = choose_providers(providers, self.available)

    def session(self, spec: dict[str, Any]) -> Any:
        digest = spec["sha256"]
        session = self._sessions.get(digest)
        if session is not None:
            return session
        with open(spec["path"], "rb") as f:
            data = f.read(int(spec["size"]) + 1)
        if len(data) != spec["size"] or hashlib.sha256(data).hexdigest() != digest:
            raise _RefusedError(
                "model_mismatch", f"{spec['path']} does not match its pinned digest"
            )
        opts = self._ort.SessionOptions()
        opts.intra_op_num_threads = self._threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        opts.log_severity_level = 3
        session = self._ort.InferenceSession(data, opts, providers=self.providers)
        self._sessions[digest] = session
        return session

    def run(self, header: dict[str, Any], buffers: list[bytes]) -> tuple[dict[str, Any], list[Any]]:
        import numpy as np

        session = self.session(header["model"])
        feeds = {
            spec["name"]: np.frombuffer(
                buf, dtype=np.dtype(spec["dtype"]).newbyteorder("<")
            ).reshape(spec["shape"])
            for spec, buf in zip(header["inputs"], buffers, strict=True)
        }
        names = [o.name for o in session.get_outputs()]
        started = time.perf_counter()
        values = session.run(names, feeds)
        run_ms = (time.perf_counter() - started) * 1000
        specs, out = [], []
        for name, value in zip(names, values, strict=True):
            if value.nbytes > frames.MAX_BUFFER_BYTES:
                raise _RefusedError(
                    "output_too_large",
                    f"output {name!r} is {value.nbytes} bytes, more than the "
                    f"{frames.MAX_BUFFER_BYTES} one tensor of a result may carry",
                )
            arr = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
            data = arr.data.cast("B")  # written as is: no copy into a bytes object
            specs.append(
                {
                    "name": name,
                    "dtype": str(arr.dtype.newbyteorder("=")),
                    "shape": list(arr.shape),
                    "nbytes": len(data),
                }
            )
            out.append(data)
        return {"ok": True, "outputs": specs, "run_ms": run_ms}, out


class _RefusedError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


_F_SETPIPE_SZ = (
    1031  # fcntl.F_SETPIPE_SZ (Linux; named in fcntl only from Python 3.10 on some builds)
)
PIPE_BYTES = 1 << 20  # the largest an unprivileged process may ask for (fs.pipe-max-size)


def _widen_pipes(*streams: BinaryIO) -> None:
    """Ask for 1 MiB pipe buffers, so that a large reply is written in one go while the
    daemon is busy elsewhere, and the next request can wait in the pipe. Best effort."""
    import fcntl

    for stream in streams:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            fcntl.fcntl(stream.fileno(), _F_SETPIPE_SZ, PIPE_BYTES)


Reply = tuple[dict[str, Any], list[Any]]


def _write_replies(out: BinaryIO, replies: queue.SimpleQueue[Reply | None]) -> None:
    while (item := replies.get()) is not None:
        try:
            _reply(out, *item)
        except BaseException:  # the daemon has gone, or we cannot answer it: stop at once,
            os._exit(1)  # so that it sees a dead worker instead of waiting for a reply


def serve(inp: BinaryIO, out: BinaryIO, threads: int, providers: Sequence[str] = (CPU,)) -> int:
    _widen_pipes(inp, out)
    runtime = Runtime(threads, providers)
    _reply(
        out,
        {
            "ok": True,
            "ready": True,
            "pid": os.getpid(),
            "providers": runtime.providers,
            "missing": [name for name in providers if name not in runtime.providers],
        },
    )
    replies: queue.SimpleQueue[Reply | None] = queue.SimpleQueue()
    writer = threading.Thread(target=_write_replies, args=(out, replies), name="replies")
    writer.start()
    try:
        _serve_requests(inp, runtime, replies)
    finally:
        replies.put(None)  # written out, in order, before the worker exits
        writer.join()
    return 0


def _serve_requests(
    inp: BinaryIO, runtime: Runtime, replies: queue.SimpleQueue[Reply | None]
) -> None:
    while (frame := frames.read_frame(inp, "inputs")) is not None:
        header, buffers = frame
        try:
            reply, data = runtime.run(header, buffers)
        except _RefusedError as exc:
            reply, data = {"ok": False, "reason": exc.reason, "detail": exc.detail}, []
        except MemoryError:
            reply, data = (
                {
                    "ok": False,
                    "reason": "memory_limit",
                    "detail": "the model needed more memory than the worker's limit",
                },
                [],
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            text = str(exc)
            reason = "memory_limit" if "alloc" in text.lower() else "runtime_error"
            reply, data = (
                {"ok": False, "reason": reason, "detail": f"onnxruntime: {text[:300]}"},
                [],
            )
        reply["key"] = header.get("key")
        replies.put((reply, data))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edge-agent-worker")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory-mb", type=int, default=0)
    p.add_argument("--providers", default=CPU, help="execution providers, comma-separated")
    args = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we stop
    _limit_memory(args.memory_mb)
    return serve(sys.stdin.buffer, sys.stdout.buffer, args.threads, args.providers.split(","))


if __name__ == "__main__":
    sys.exit(main())
