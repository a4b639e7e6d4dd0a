"""Runs inference in a separate worker process that the daemon can pause, stop or kill at once.

`WorkerEngine` starts `python -m agent.inference.worker` when there is work
and stops it after `idle_s` without any. The daemon never imports
onnxruntime. The worker can be:
  - paused and resumed (SIGSTOP / SIGCONT, about 0.1 ms): the power governor's
    duty cycle; paused time does not count against the job's deadline;
  - killed (SIGSTOP then SIGKILL): preemption, a deadline, shutdown. Compute
    stops when SIGSTOP lands, not when onnxruntime next checks a flag.
A worker that dies under a job (a crashing model, the memory limit, a kill)
fails that job with a typed reason; the next job starts a fresh worker.

Staging: while one job computes, the daemon may `stage` the next one: its frame
is written to the worker's pipe at once, and the worker starts it the moment the
current one is answered, without waiting for the daemon's event loop. Every
request carries a key that the worker echoes; `run` for a staged key just waits
for its reply. A staged job that is not run after all (the gate closed) is
discarded by killing the worker: the daemon never leaves compute running that it
did not start on purpose.

Replies are read by a thread of the engine's own, whole frames at a time, and
handed to the event loop: a reply larger than the pipe (PP-OCR's is 1.06 MB, the
pipe 1 MiB) would otherwise hold the worker at its last write until the loop
got round to reading, and the staged job would wait with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.core.admission import HeldModel
from agent.inference import frames
from agent.inference.frames import Frame
from agent.kit.logs import get_logger
from agent.wire.errors import Reason, WireError
from agent.wire.tensors import Tensor

_START_TIMEOUT_S = 60.0


class _Replies:
    """A worker's replies, read whole by a thread and queued for the event loop; None once
    the worker's stdout has closed (it exited or was killed) or sent something not a frame."""

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        self._queue: asyncio.Queue[Frame | None] = asyncio.Queue()
        self._ended = False
        threading.Thread(
            target=self._pump, args=(fd, loop), name="worker-replies", daemon=True
        ).start()

    def _pump(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        frame: Frame | None = None
        with open(fd, "rb", buffering=0) as stream:
            while True:
                try:
                    frame = frames.read_frame(stream, "outputs")
                except Exception:  # not a frame, or no memory for one: the worker is done for
                    frame = None
                self._post(loop, frame)
                if frame is None:
                    return

    def _post(self, loop: asyncio.AbstractEventLoop, frame: Frame | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
            loop.call_soon_threadsafe(self._queue.put_nowait, frame)

    async def next(self) -> Frame | None:
        if self._ended:
            return None
        frame = await self._queue.get()
        self._ended = frame is None
        return frame


class WorkerEngine:
    """One worker process at a time, one job at a time."""

    def __init__(
        self,
        *,
        threads: int = 1,
        memory_mb: int = 2048,
        idle_s: float = 10.0,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        self.providers = tuple(providers)
        self.using: tuple[str, ...] = ()  # what the running worker's onnxruntime took
        self.threads = threads
        self.memory_mb = memory_mb
        self.idle_s = idle_s
        self._proc: asyncio.subprocess.Process | None = None
        self._replies: _Replies | None = None
        self._lock = asyncio.Lock()
        self._log = get_logger(component="worker")
        self._paused_since: float | None = None
        self._paused_total = 0.0
        self._last_used = 0.0
        self.starts = 0
        self.busy = False
        # Keys of requests written to the current worker and not yet answered, in order.
        self._outstanding: deque[str] = deque()
        # A job staged while the running one's worker was still starting.
        self._pending: tuple[str, HeldModel, Path, Mapping[str, Tensor]] | None = None

    # ---- process control (synchronous: called from the gate's hot path) ----

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    def kill(self) -> None:
        """SIGSTOP then SIGKILL: no more CPU from the moment the first signal lands."""
        pid = self.pid
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
            os.kill(pid, signal.SIGKILL)
        self._paused_since = None
        self._outstanding.clear()
        self._pending = None

    @property
    def computing(self) -> str | None:
        """The key of the request the worker is on now (the running one, or the staged one
        once the running one has answered), if any."""
        return self._outstanding[0] if self._outstanding else None

    @property
    def requests(self) -> int:
        """Requests written to the worker and not yet answered (the running one, and the
        one staged behind it)."""
        return len(self._outstanding)

    @property
    def has_work(self) -> bool:
        """A request is running or staged in the worker."""
        return self.busy or bool(self._outstanding) or self._pending is not None

    def pause(self) -> None:
        pid = self.pid
        if pid is not None and self._paused_since is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
            self._paused_since = time.monotonic()

    def resume(self) -> None:
        pid = self.pid
        if self._paused_since is not None:
            self._paused_total += time.monotonic() - self._paused_since
            self._paused_since = None
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    @property
    def paused(self) -> bool:
        return self._paused_since is not None

    def cpu_seconds(self) -> float | None:
        """CPU time the worker's threads have run so far (ns-precise, from schedstat), or None."""
        pid = self.pid
        if pid is None:
            return None
        total = 0
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as f:
                    total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return total / 1e9

    # ---- lifecycle ---------------------------------------------------------

    async def _ensure_started(self) -> asyncio.subprocess.Process:
        if self._proc is not None and self._proc.returncode is None:
            return self._proc
        await self._reap()
        replies, stdout = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "agent.inference.worker",
                "--threads",
                str(self.threads),
                "--memory-mb",
                str(self.memory_mb),
                "--providers",
                ",".join(self.providers),
                stdin=asyncio.subprocess.PIPE,
                stdout=stdout,
            )
        except OSError as exc:  # no fork, no memory, no executable: not the job's fault
            os.close(replies)
            raise WireError(
                Reason.WORKER_UNAVAILABLE, f"the inference worker could not be started: {exc}"
            ) from None
        except BaseException:
            os.close(replies)
            raise
        finally:
            os.close(stdout)  # the worker holds it: its exit is the reader's end of stream
        self._proc = proc
        self._replies = _Replies(replies, asyncio.get_running_loop())
        self.starts += 1
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):
                ready, _ = await self._read_frame(proc)
        except (TimeoutError, WireError) as exc:
            self.kill()
            await self._reap()
            why = (
                exc.detail if isinstance(exc, WireError) else f"no answer in {_START_TIMEOUT_S:g} s"
            )
            raise WireError(
                Reason.WORKER_UNAVAILABLE, f"the inference worker did not start: {why}"
            ) from None
        self.using = tuple(ready.get("providers") or ())
        self._log.info(
            "worker_started",
            pid=ready.get("pid"),
            memory_mb=self.memory_mb,
            providers=ready.get("providers"),
        )
        if ready.get("missing"):
            self._log.warning(
                "execution_provider_unavailable",
                missing=ready.get("missing"),
                using=ready.get("providers"),
                fix="this onnxruntime build lacks them (docs/install.md, Jetson); the CPU runs the jobs",
            )
        return proc

    async def _reap(self) -> None:
        proc, self._proc = self._proc, None
        self._replies = None  # its thread ends with the worker's stdout
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        with contextlib.suppress(ProcessLookupError):
            await proc.wait()
        self._paused_since = None
        self._outstanding.clear()
        self._pending = None

    async def stop(self) -> None:
        """Stop the worker (idle or at shutdown)."""
        if self._proc is not None and self._proc.returncode is None:
            self._log.info("worker_stopping", pid=self._proc.pid)
        self.kill()
        await self._reap()

    async def stop_if_idle(self, now: float) -> bool:
        if self._proc is not None and not self.has_work and now - self._last_used > self.idle_s:
            await self.stop()
            return True
        return False

    # ---- one job -----------------------------------------------------------

    async def _read_frame(self, proc: asyncio.subprocess.Process) -> Frame:
        frame = await self._replies.next() if self._replies is not None else None
        if frame is None:
            raise _died(await proc.wait())
        return frame

    def _write(
        self,
        proc: asyncio.subprocess.Process,
        key: str,
        model: HeldModel,
        path: Path,
        inputs: Mapping[str, Tensor],
    ) -> None:
        """Queue one request frame on the worker's stdin (synchronous: frames never interleave)."""
        assert proc.stdin is not None
        header = {
            "op": "run",
            "key": key,
            "model": {"sha256": model.sha256, "size": model.size, "path": str(path)},
            "inputs": [
                {"name": n, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes}
                for n, t in inputs.items()
            ],
        }
        proc.stdin.writelines(frames.encode(header, [t.data for t in inputs.values()]))
        self._outstanding.append(key)

    async def stage(
        self, key: str, model: HeldModel, path: Path, inputs: Mapping[str, Tensor]
    ) -> bool:
        """Write the next job's request now, behind the one running, if a worker is up and
        nothing else is staged. True if staged."""
        if not self.busy or self._pending is not None or len(self._outstanding) > 1:
            return False
        if key in self._outstanding:
            return False  # staged already; the running job's reply was just read
        proc = self._proc
        if proc is None or proc.returncode is not None or not self._outstanding:
            # The running job's worker is still starting: written right after its request.
            self._pending = (key, model, path, inputs)
            return True
        self._write(proc, key, model, path, inputs)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            assert proc.stdin is not None
            await proc.stdin.drain()  # the run that reads its reply sees a dead worker
        return True

    async def _exchange(
        self, proc: asyncio.subprocess.Process, key: str
    ) -> tuple[dict[str, Any], list[bytes]]:
        """Wait for the reply to `key` (already written)."""
        assert proc.stdin is not None
        try:
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            raise _died(await proc.wait()) from None
        reply, out = await self._read_frame(proc)
        if reply.get("key") != key or not self._outstanding or self._outstanding[0] != key:
            raise WireError(Reason.RUNTIME_ERROR, f"the worker answered {reply.get('key')!r}")
        self._outstanding.popleft()
        return reply, out

    def _active_s(self, started: float) -> float:
        paused = self._paused_total + (
            time.monotonic() - self._paused_since if self._paused_since is not None else 0.0
        )
        return time.monotonic() - started - paused

    async def run(
        self,
        model: HeldModel,
        path: Path,
        inputs: Mapping[str, Tensor],
        *,
        deadline_s: float,
        key: str = "",
    ) -> dict[str, Tensor]:
        """Run one request (or wait for the staged one with this key) and return its outputs.

        A job the worker turns down with a typed reply (the model's own error, an output too
        large for a result, a model file off its pin) fails without costing the worker: its
        answer was read whole, so it keeps its sessions and any job staged behind. One that
        ran out of memory gets a fresh worker; one cancelled, past its deadline or crashed
        leaves the pipe mid-frame, and the worker is killed."""
        async with self._lock:
            self.busy = True
            try:
                reply, buffers = await self._run(
                    key or f"run-{time.monotonic_ns()}", model, path, inputs, deadline_s
                )
                if reply.get("reason") == "memory_limit":  # answered, but its heap is suspect
                    self.kill()
                    await self._reap()
            except BaseException:
                # Cancelled (preempted), timed out or crashed: the pipe may be mid-frame.
                self.kill()
                await asyncio.shield(self._reap())
                raise
            finally:
                self.busy = False
                self._last_used = time.monotonic()
        return _outputs(reply, buffers)

    async def _run(
        self,
        key: str,
        model: HeldModel,
        path: Path,
        inputs: Mapping[str, Tensor],
        deadline_s: float,
    ) -> tuple[dict[str, Any], list[bytes]]:
        if self._outstanding and self._outstanding[0] != key:
            # Something staged was not run after all: its compute must not go on unasked.
            self._log.info("staged_job_discarded", staged=self._outstanding[0], running=key)
            self.kill()
            await self._reap()
        proc = await self._ensure_started()
        self.resume()
        if not self._outstanding:
            self._write(proc, key, model, path, inputs)
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] != key:  # (staged as this very job: sent above)
            self._write(proc, *pending)
        self._paused_total = 0.0
        started = time.monotonic()
        exchange = asyncio.ensure_future(self._exchange(proc, key))
        try:
            while True:
                remaining = deadline_s - self._active_s(started)
                if remaining <= 0:
                    raise WireError(Reason.DEADLINE, f"ran past max_runtime_s={deadline_s:g}")
                done, _ = await asyncio.wait({exchange}, timeout=remaining)
                if done:
                    break
        finally:
            if not exchange.done():
                exchange.cancel()
                with contextlib.suppress(asyncio.CancelledError, WireError):
                    await exchange
        return exchange.result()


def _outputs(reply: dict[str, Any], buffers: list[bytes]) -> dict[str, Tensor]:
    """The outputs of a reply read whole, or the typed failure it reports."""
    if not reply.get("ok"):
        reason = str(reply.get("reason", "runtime_error"))
        code = {
            "model_mismatch": Reason.MODEL_MISMATCH,
            "memory_limit": Reason.MEMORY_LIMIT,
        }.get(reason, Reason.RUNTIME_ERROR)
        raise WireError(code, str(reply.get("detail", ""))[:400])
    try:
        return {
            spec["name"]: Tensor(dtype=spec["dtype"], shape=tuple(spec["shape"]), data=buf)
            for spec, buf in zip(reply["outputs"], buffers, strict=True)
        }
    except ValidationError as exc:
        raise WireError(
            Reason.RUNTIME_ERROR, f"the model produced an output the wire cannot carry: {exc}"
        ) from None


def _died(returncode: int | None) -> WireError:
    """Why the worker is gone: a SIGKILL came from outside (the agent's own kills are known to
    the caller, and its memory limit is RLIMIT_AS inside the worker), anything else is a crash."""
    if returncode == -signal.SIGKILL:
        return WireError(
            Reason.WORKER_KILLED, "the inference worker was killed from outside (SIGKILL)"
        )
    return WireError(Reason.WORKER_CRASHED, f"the inference worker died ({_describe(returncode)})")


def _describe(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"
