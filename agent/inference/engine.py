"""Running a verified model on inputs, off the event loop.

`InferenceEngine` is the interface the daemon uses. `InProcessEngine` runs
onnxruntime in a thread of the daemon's process, importing onnxruntime only
on first use; sessions are cached per model digest, intra-op threads follow
the config and thread spinning is off (it burns power after every run).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from agent.core.admission import HeldModel
from agent.wire.errors import Reason, WireError
from agent.wire.tensors import Tensor


class InferenceEngine(Protocol):
    async def run(
        self, model: HeldModel, load: Callable[[], bytes], inputs: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Run `model` (its verified bytes come from `load`) on `inputs`."""
        ...


class InProcessEngine:
    """onnxruntime in a worker thread of this process."""

    def __init__(self, *, intra_op_threads: int = 1) -> None:
        self._threads = intra_op_threads
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _session(self, model: HeldModel, load: Callable[[], bytes]) -> Any:
        with self._lock:
            session = self._sessions.get(model.sha256)
            if session is None:
                import onnxruntime as ort

                opts = ort.SessionOptions()
                opts.intra_op_num_threads = self._threads
                opts.inter_op_num_threads = 1
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
                opts.log_severity_level = 3
                session = ort.InferenceSession(load(), opts, providers=["CPUExecutionProvider"])
                self._sessions[model.sha256] = session
            return session

    def _run_sync(
        self, model: HeldModel, load: Callable[[], bytes], inputs: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        session = self._session(model, load)
        feeds = {name: t.to_numpy() for name, t in inputs.items()}
        names = [o.name for o in session.get_outputs()]
        try:
            values = session.run(names, feeds)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise WireError(Reason.RUNTIME_ERROR, f"onnxruntime: {str(exc)[:300]}") from None
        return {n: Tensor.from_numpy(v) for n, v in zip(names, values, strict=True)}

    async def run(
        self, model: HeldModel, load: Callable[[], bytes], inputs: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        return await asyncio.to_thread(self._run_sync, model, load, inputs)
