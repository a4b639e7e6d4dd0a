"""The models a vehicle holds, each pinned by sha256 and byte length.

Two places, one store:
  - the shipped folder (config `models.dir`, read-only): manifest.json beside the model
    files names each model, its file, digest, size and inputs;
  - the installed area in the state directory (`<state>/models/`), filled by
    `edge-agent models add`: each file is copied into a private staging folder, hashed
    as it is written, checked against the pin the operator gives, inspected
    (agent/inference/modelcheck.py: no external data, operator domains in the
    allowlist), and only then renamed into place and recorded in installed.json.
    A refused file leaves nothing behind.
Files are verified (size, sha256, structure) when the store opens, and the worker
verifies the sha256 again from the bytes it loads: what reaches onnxruntime is exactly
what was pinned and inspected, never a file swapped since.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.core.admission import HeldModel, InputSpec
from agent.inference.modelcheck import DEFAULT_DOMAINS, ModelCheckError, check_model
from agent.wire.codec import REGEX_ENGINE, exactly
from agent.wire.errors import Reason, WireError

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
INSTALLED = "installed.json"
STAGING = ".staging"
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ModelStoreError(Exception):
    """Raised when the model folder or its manifest cannot be used at all."""


class _ManifestInput(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", regex_engine=REGEX_ENGINE)
    dtype: str
    shape: tuple[int | None, ...]


class _ManifestModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", regex_engine=REGEX_ENGINE)
    name: str = Field(pattern=exactly(r"[A-Za-z0-9_.-]{1,64}"))
    file: str = Field(pattern=exactly(r"[A-Za-z0-9_.-]{1,128}"))  # a bare name: no separators
    sha256: str = Field(pattern=exactly(r"[0-9a-f]{64}"))
    size: int = Field(gt=0)
    inputs: dict[str, _ManifestInput]


class _Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", regex_engine=REGEX_ENGINE)
    version: int
    models: tuple[_ManifestModel, ...]


class ModelStore:
    """Verified models by name: the shipped folder's, then the installed area's."""

    def __init__(
        self,
        folder: Path,
        models: dict[str, tuple[HeldModel, Path]],
        *,
        installed: Path | None = None,
        allowed_domains: frozenset[str] = DEFAULT_DOMAINS,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.folder = folder
        self.installed = installed
        self.allowed_domains = allowed_domains
        self.max_bytes = max_bytes
        self._models = models
        self.problems: list[str] = []
        self.stamp: tuple[tuple[int, int] | None, ...] = ()

    @classmethod
    def open(
        cls,
        folder: Path,
        *,
        installed: Path | None = None,
        allowed_domains: frozenset[str] = DEFAULT_DOMAINS,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> ModelStore:
        store = cls(
            folder,
            {},
            installed=installed,
            allowed_domains=allowed_domains,
            max_bytes=max_bytes,
        )
        store.stamp = store.manifests_stamp()
        store._load(folder / "manifest.json", required=True)
        if installed is not None:
            store._load(installed / INSTALLED, required=False)
        return store

    def _load(self, manifest_path: Path, *, required: bool) -> None:
        try:
            manifest = _Manifest.model_validate_json(manifest_path.read_bytes())
        except FileNotFoundError:
            if required:
                raise ModelStoreError(f"cannot read {manifest_path}: no such file") from None
            return
        except OSError as exc:
            raise ModelStoreError(f"cannot read {manifest_path}: {exc.strerror}") from None
        except ValidationError as exc:
            raise ModelStoreError(f"{manifest_path} is not a valid manifest: {exc}") from None
        for entry in manifest.models:
            held = HeldModel(
                name=entry.name,
                sha256=entry.sha256,
                size=entry.size,
                inputs={k: InputSpec(v.dtype, v.shape) for k, v in entry.inputs.items()},
            )
            path = manifest_path.parent / entry.file
            if entry.name in self._models:
                self.problems.append(f"model {entry.name} in {manifest_path} left out: name taken")
                continue
            if entry.size > self.max_bytes:
                self.problems.append(
                    f"model {entry.name} left out: {entry.size} bytes exceeds models.max_bytes"
                )
                continue
            try:
                check_model(_verified_bytes(path, held), self.allowed_domains)
            except WireError as exc:
                self.problems.append(f"model {entry.name} left out: {exc.detail}")
                continue
            except ModelCheckError as exc:
                self.problems.append(f"model {entry.name} left out: {exc}")
                continue
            self._models[entry.name] = (held, path)

    def manifests_stamp(self) -> tuple[tuple[int, int] | None, ...]:
        """(mtime_ns, size) of the manifests this store was read from: a reload reopens the
        store (and re-hashes every model) only when one of them changed."""
        paths = [self.folder / "manifest.json"]
        if self.installed is not None:
            paths.append(self.installed / INSTALLED)
        stamps: list[tuple[int, int] | None] = []
        for path in paths:
            try:
                st = path.stat()
            except OSError:
                stamps.append(None)
            else:
                stamps.append((st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    @property
    def held(self) -> dict[str, HeldModel]:
        return {name: held for name, (held, _) in self._models.items()}

    def path_of(self, model: HeldModel) -> Path:
        return self._models[model.name][1]

    def install(self, source: Path, *, name: str, sha256: str) -> HeldModel:
        """Stage, verify against `sha256`, inspect, then move `source` into the installed area.

        ModelStoreError saying why on any refusal; nothing is left in the store then.
        """
        if self.installed is None:
            raise ModelStoreError("this store has no installed area (no state directory)")
        if not _NAME.fullmatch(name):
            raise ModelStoreError(f"model name {name!r}: use 1-64 of A-Z a-z 0-9 _ . -")
        if not _SHA256.fullmatch(sha256):
            raise ModelStoreError("the pin must be a sha256: 64 lowercase hex characters")
        if name in self._models:
            raise ModelStoreError(f"a model named {name!r} is already held")
        staging = self.installed / STAGING
        part = staging / f"{sha256}.{os.getpid()}.part"
        try:
            staging.mkdir(mode=0o700, parents=True, exist_ok=True)
            staging.chmod(0o700)
        except OSError as exc:
            raise ModelStoreError(
                f"cannot use {staging}: {exc.strerror}; run as the agent's user (or root)"
            ) from None
        try:
            size = _copy_hashed(source, part, self.max_bytes, sha256)
            data = part.read_bytes()
            try:
                facts = check_model(data, self.allowed_domains)
            except ModelCheckError as exc:
                raise ModelStoreError(f"{source} refused: {exc}") from None
            final = self.installed / f"{sha256}.onnx"
            # Not a secret, and `models add` may run as root for a service with a dynamic user.
            part.chmod(0o644)
            os.replace(part, final)
        except OSError as exc:
            raise ModelStoreError(f"installing {source} failed: {exc}; nothing kept") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
        held = HeldModel(name=name, sha256=sha256, size=size, inputs=facts.inputs)
        self._models[name] = (held, final)
        try:
            self._write_installed()
        except OSError as exc:
            del self._models[name]
            with contextlib.suppress(OSError):
                final.unlink()
            raise ModelStoreError(f"cannot record {name} in {INSTALLED}: {exc}") from None
        return held

    def _write_installed(self) -> None:
        assert self.installed is not None
        entries = [
            {
                "name": held.name,
                "file": path.name,
                "sha256": held.sha256,
                "size": held.size,
                "inputs": {
                    k: {"dtype": v.dtype, "shape": list(v.shape)} for k, v in held.inputs.items()
                },
            }
            for held, path in self._models.values()
            if path.parent == self.installed
        ]
        tmp = self.installed / f"{INSTALLED}.tmp"
        tmp.write_text(json.dumps({"version": 1, "models": entries}, indent=1))
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.installed / INSTALLED)


def _copy_hashed(source: Path, part: Path, max_bytes: int, sha256: str) -> int:
    """Copy `source` to `part` (0600, new), refusing more than `max_bytes` or another digest."""
    digest = hashlib.sha256()
    size = 0
    try:
        src = source.open("rb")
    except OSError as exc:
        raise ModelStoreError(f"cannot read {source}: {exc.strerror}") from None
    with src, os.fdopen(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
        while chunk := src.read(1 << 20):
            size += len(chunk)
            if size > max_bytes:
                raise ModelStoreError(
                    f"{source} is larger than models.max_bytes ({max_bytes} bytes): refused"
                )
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if digest.hexdigest() != sha256:
        raise ModelStoreError(
            f"{source} does not match its pin: sha256 {digest.hexdigest()[:16]}.. where "
            f"{sha256[:16]}.. was given; refused, nothing kept"
        )
    return size


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
