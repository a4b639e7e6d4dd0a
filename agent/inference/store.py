"""The models a vehicle holds, each pinned by sha256 and byte length in a manifest.

The manifest (manifest.json beside the model files) names each model, its
file, digest, size and inputs. Files are verified when the store opens and
again, from the bytes actually read, every time a model is loaded: what is
handed to onnxruntime is exactly what was pinned, never a file swapped since.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.core.admission import HeldModel, InputSpec
from agent.wire.errors import Reason, WireError


class ModelStoreError(Exception):
    """Raised when the model folder or its manifest cannot be used at all."""


class _ManifestInput(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    dtype: str
    shape: tuple[int | None, ...]


class _ManifestModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    file: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,128}$")  # a bare file name: no separators
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(gt=0)
    inputs: dict[str, _ManifestInput]


class _Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    version: int
    models: tuple[_ManifestModel, ...]


class ModelStore:
    """Verified models by name, read from a folder with a manifest."""

    def __init__(self, folder: Path, models: dict[str, tuple[HeldModel, Path]]) -> None:
        self.folder = folder
        self._models = models
        self.problems: list[str] = []

    @classmethod
    def open(cls, folder: Path) -> ModelStore:
        manifest_path = folder / "manifest.json"
        try:
            manifest = _Manifest.model_validate_json(manifest_path.read_bytes())
        except OSError as exc:
            raise ModelStoreError(f"cannot read {manifest_path}: {exc.strerror}") from None
        except ValidationError as exc:
            raise ModelStoreError(f"{manifest_path} is not a valid manifest: {exc}") from None
        models: dict[str, tuple[HeldModel, Path]] = {}
        problems: list[str] = []
        for entry in manifest.models:
            held = HeldModel(
                name=entry.name,
                sha256=entry.sha256,
                size=entry.size,
                inputs={k: InputSpec(v.dtype, v.shape) for k, v in entry.inputs.items()},
            )
            path = folder / entry.file
            try:
                _verified_bytes(path, held)
            except WireError as exc:
                problems.append(f"model {entry.name} left out: {exc.detail}")
                continue
            models[entry.name] = (held, path)
        store = cls(folder, models)
        store.problems = problems
        return store

    @property
    def held(self) -> dict[str, HeldModel]:
        return {name: held for name, (held, _) in self._models.items()}

    def path_of(self, model: HeldModel) -> Path:
        return self._models[model.name][1]


def _verified_bytes(path: Path, model: HeldModel) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(model.size + 1)
    except OSError as exc:
        raise WireError(Reason.MODEL_MISMATCH, f"cannot read {path.name}: {exc.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != model.size or digest != model.sha256:
        raise WireError(
            Reason.MODEL_MISMATCH,
            f"{path.name} does not match its pin (size {len(data)} vs {model.size}, "
            f"sha256 {digest[:12]}.. vs {model.sha256[:12]}..)",
        )
    return data
