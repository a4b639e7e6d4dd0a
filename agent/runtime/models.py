"""The models this vehicle holds, as every room sees them, and their refresh on reload.

`edge-agent models add` installs a model while the agent runs; a reload (SIGHUP) asks the
`models-reload` task to open the store again, re-verified, off the event loop: hashing and
inspecting every model must not stall the loop (or the duty cycle).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

from agent.core.admission import HeldModel
from agent.inference.store import ModelStore, ModelStoreError
from agent.runtime.record import Recorder


class Shelf:
    def __init__(self, store: ModelStore, recorder: Recorder) -> None:
        self._store = store
        self._rec = recorder
        self._wanted = asyncio.Event()

    @property
    def held(self) -> Mapping[str, HeldModel]:
        return self._store.held

    @property
    def problems(self) -> list[str]:
        return list(self._store.problems)

    def path_of(self, model: HeldModel) -> Path:
        return self._store.path_of(model)

    def changed_on_disk(self) -> bool:
        """A model was installed (or removed) since the store was opened."""
        return self._store.manifests_stamp() != self._store.stamp

    def refresh_soon(self) -> None:
        """Ask the `models-reload` task to open the store again."""
        self._wanted.set()

    def _open(self) -> ModelStore | ModelStoreError:
        old = self._store
        try:
            return ModelStore.open(
                old.folder,
                installed=old.installed,
                allowed_domains=old.allowed_domains,
                max_bytes=old.max_bytes,
            )
        except ModelStoreError as exc:
            return exc

    def take(self, store: ModelStore | ModelStoreError) -> None:
        """Hold `store` from now on (or keep the old one, saying why)."""
        old = self._store
        if isinstance(store, ModelStoreError):
            self._rec.log("error", "models_not_reloaded", error=str(store), kept=sorted(old.held))
            return
        self._store = store
        self._rec.log("info", "models_reopened", models=sorted(store.held))
        for problem in store.problems:
            self._rec.log("warning", "model_left_out", problem=problem)
        added = sorted(set(store.held) - set(old.held))
        if added:
            self._rec.log("info", "models_added", models=added)

    async def run(self) -> None:
        """The `models-reload` task."""
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            self.take(await asyncio.to_thread(self._open))
