"""The model store: files staged privately, verified against their pin, inspected, then moved in;
models with external data or operator domains outside the allowlist never reach onnxruntime."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from agent.inference.modelcheck import ModelCheckError, check_model, inspect_model
from agent.inference.store import STAGING, ModelStore, ModelStoreError
from agent.kit.exitcodes import ExitCode
from tests.support import MODELS, FleetKeys, write_vehicle

ONNX_DTYPES = {TensorProto.FLOAT: "float32", TensorProto.INT64: "int64"}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _add_model(domain: str = "", *, nested: bool = False) -> onnx.ModelProto:
    """y = x + w, with the Add in `domain` (optionally inside an If branch)."""
    w = numpy_helper.from_array(np.ones((1, 4), np.float32), "w")
    add = helper.make_node("Add", ["x", "w"], ["y"], domain=domain)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    opsets = [helper.make_opsetid("", 17)]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    if not nested:
        graph = helper.make_graph([add], "g", [x], [y], [w])
    else:
        branch = helper.make_graph([add], "branch", [], [y])
        cond = numpy_helper.from_array(np.array(True), "cond")
        node = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)
        graph = helper.make_graph([node], "g", [x], [y], [w, cond])
    return helper.make_model(graph, opset_imports=opsets)


def _external_model(tmp_path) -> bytes:
    model = _add_model()
    path = tmp_path / "ext.onnx"
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    return path.read_bytes()


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore.open(MODELS, installed=tmp_path / "state" / "models")


def _left_in_store(store: ModelStore) -> list[str]:
    assert store.installed is not None
    return sorted(
        str(p.relative_to(store.installed)) for p in store.installed.rglob("*") if p.is_file()
    )


@pytest.mark.parametrize("name", ["digits.onnx", "burn.onnx"])
def test_inspection_agrees_with_onnx(name):
    """Domains and inputs read by our wire walker match what the onnx package reads."""
    data = (MODELS / name).read_bytes()
    facts = inspect_model(data)
    model = onnx.load_from_string(data)
    domains = {o.domain for o in model.opset_import} | {n.domain for n in model.graph.node}
    assert facts.domains == domains
    inits = {i.name for i in model.graph.initializer}
    expected = {
        i.name: (
            ONNX_DTYPES[i.type.tensor_type.elem_type],
            tuple(
                d.dim_value if d.HasField("dim_value") else None
                for d in i.type.tensor_type.shape.dim
            ),
        )
        for i in model.graph.input
        if i.name not in inits
    }
    assert {k: (v.dtype, v.shape) for k, v in facts.inputs.items()} == expected
    assert facts.external_data == []


def test_external_data_is_refused(tmp_path):
    """A model whose weights live in another file is refused before any session exists."""
    with pytest.raises(ModelCheckError, match="external files"):
        check_model(_external_model(tmp_path))


@pytest.mark.parametrize("nested", [False, True], ids=["top-level", "inside-an-If-branch"])
def test_domain_outside_the_allowlist_is_refused(nested):
    """A custom operator domain is refused, also when it hides in a subgraph; the operator can
    allow it by name."""
    data = _add_model("com.evil", nested=nested).SerializeToString()
    with pytest.raises(ModelCheckError, match=r"com\.evil"):
        check_model(data)
    assert "com.evil" in check_model(data, frozenset({"", "com.evil"})).domains


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00\x01\x02", b"\x3a\xff\xff\xff\xff\x0f", b"\x08" + b"\xff" * 11, b"not onnx"],
    ids=["empty", "field-zero", "length-past-end", "long-varint", "text"],
)
def test_malformed_files_are_typed_errors(data):
    with pytest.raises(ModelCheckError):
        check_model(data)


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_give_only_model_check_errors(data):
    """Whatever the bytes, the walker answers with facts or a ModelCheckError, nothing else."""
    with contextlib.suppress(ModelCheckError):
        check_model(data)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_real_models_give_only_model_check_errors(data):
    raw = bytearray((MODELS / "digits.onnx").read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(raw)))
    with contextlib.suppress(ModelCheckError):
        check_model(bytes(raw[:cut]))


def test_install_stages_verifies_and_moves_into_place(store, tmp_path):
    """A pinned file is installed under its digest, recorded, and held after a reopen."""
    source = MODELS / "burn.onnx"
    held = store.install(source, name="burn-b", sha256=_sha(source.read_bytes()))
    assert held.inputs["x"].shape == (1, 256)
    assert _left_in_store(store) == [f"{held.sha256}.onnx", "installed.json"]
    assert oct(store.path_of(held).stat().st_mode & 0o777) == "0o644"  # readable by the agent
    again = ModelStore.open(MODELS, installed=store.installed)
    assert again.held["burn-b"] == held
    assert again.problems == []


def test_install_refuses_a_file_that_does_not_match_its_pin(store):
    """Wrong bytes for the pin: refused, and nothing partial is left in staging or the store."""
    with pytest.raises(ModelStoreError, match="does not match its pin"):
        store.install(MODELS / "burn.onnx", name="burn-b", sha256="0" * 64)
    assert _left_in_store(store) == []
    assert "burn-b" not in store.held


def test_install_refuses_hostile_models_and_leaves_nothing(store, tmp_path):
    for name, data in [
        ("ext", _external_model(tmp_path)),
        ("evil", _add_model("com.evil").SerializeToString()),
    ]:
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(data)
        with pytest.raises(ModelStoreError, match="refused"):
            store.install(path, name=name, sha256=_sha(data))
    assert _left_in_store(store) == []
    assert oct((store.installed / STAGING).stat().st_mode & 0o777) == "0o700"


def test_install_refuses_a_file_over_the_size_limit(tmp_path):
    store = ModelStore.open(MODELS, installed=tmp_path / "models", max_bytes=200_000)
    source = MODELS / "burn.onnx"  # 263 KB
    with pytest.raises(ModelStoreError, match=r"larger than models\.max_bytes"):
        store.install(source, name="big", sha256=_sha(source.read_bytes()))
    assert _left_in_store(store) == []


def test_install_refuses_bad_names_and_pins_and_taken_names(store):
    source = MODELS / "burn.onnx"
    sha = _sha(source.read_bytes())
    for kwargs, needle in [
        (dict(name="../x", sha256=sha), "model name"),
        (dict(name="x", sha256="ABC"), "sha256"),
        (dict(name="digits", sha256=sha), "already held"),
    ]:
        with pytest.raises(ModelStoreError, match=needle):
            store.install(source, **kwargs)


def test_an_unusable_store_folder_is_a_clear_error(tmp_path):
    """A file where the installed area or its staging folder should be, or a damaged
    installed.json: a ModelStoreError naming it, not a traceback."""
    blocker = tmp_path / "models"
    blocker.write_text("not a folder")
    with pytest.raises(ModelStoreError, match="Not a directory"):
        ModelStore.open(MODELS, installed=blocker)
    blocker.unlink()
    blocker.mkdir()
    (blocker / "installed.json").write_text('{"version": 1, "models": "all of them"}')
    with pytest.raises(ModelStoreError, match=r"installed\.json is not a valid manifest"):
        ModelStore.open(MODELS, installed=blocker)
    (blocker / "installed.json").unlink()
    (blocker / STAGING).write_text("not a folder")
    store = ModelStore.open(MODELS, installed=blocker)
    source = MODELS / "burn.onnx"
    with pytest.raises(ModelStoreError, match="cannot use"):
        store.install(source, name="burn-b", sha256=_sha(source.read_bytes()))


def test_a_file_swapped_after_install_is_left_out_at_the_next_open(store):
    """The store re-verifies every file when it opens: a swapped file is reported, not held."""
    source = MODELS / "burn.onnx"
    held = store.install(source, name="burn-b", sha256=_sha(source.read_bytes()))
    path = store.path_of(held)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    again = ModelStore.open(MODELS, installed=store.installed)
    assert "burn-b" not in again.held
    assert any("burn-b" in p and "does not match" in p for p in again.problems)


def test_shipped_models_are_inspected_too(tmp_path):
    """A shipped folder whose model uses a domain outside the allowlist leaves that model out."""
    folder = tmp_path / "shipped"
    shutil.copytree(MODELS, folder)
    store = ModelStore.open(folder, allowed_domains=frozenset({""}))
    assert "digits" not in store.held  # uses ai.onnx.ml
    assert "burn" in store.held
    assert any("ai.onnx.ml" in p for p in store.problems)


def test_models_cli_installs_and_refuses_with_exit_codes(tmp_path):
    """`edge-agent models add` installs a pinned file (exit 0) and refuses a wrong pin (exit 78)
    with the reason; `models list` shows it."""
    files = write_vehicle(tmp_path, "veh-models", port=1883, fleet=FleetKeys())
    source = MODELS / "burn.onnx"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "agent.cli",
                "models",
                *args,
                "--config",
                str(files.config_path),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    bad = cli("add", str(source), "--name", "burn-b", "--sha256", "1" * 64)
    assert bad.returncode == ExitCode.CONFIG
    assert "does not match its pin" in bad.stderr
    good = cli("add", str(source), "--name", "burn-b", "--sha256", _sha(source.read_bytes()))
    assert good.returncode == ExitCode.OK, good.stderr
    listed = cli("list")
    assert "burn-b" in listed.stdout and "digits" in listed.stdout


@pytest.mark.broker
async def test_a_reload_picks_up_an_installed_model_and_only_then_rereads_the_store(
    mosquitto, tmp_path
):
    """A reload with nothing installed keeps the store as it is (no re-hashing); after
    `models add`, a reload holds the new model and a job for it runs."""
    from agent.config import load_config
    from agent.wire.messages import ModelRef
    from tests.support import burn_spec, observing, running_agent, signed, wait_for

    fleet = FleetKeys()
    files = write_vehicle(tmp_path, "veh-models", port=mosquitto.port, fleet=fleet)
    async with observing(mosquitto.port, "veh-models") as obs, running_agent(files) as agent:
        reopened: list[str] = []
        agent.watch_happenings(
            lambda h: reopened.append(h.event) if h.event == "models_reopened" else None
        )
        agent.reload(load_config(files.config_path))
        await asyncio.sleep(0.3)
        assert reopened == [], "nothing installed: the store is not read again"
        source = MODELS / "burn.onnx"
        sha = _sha(source.read_bytes())
        ModelStore.open(MODELS, installed=files.config_path.parent / "state" / "models").install(
            source, name="burn-b", sha256=sha
        )
        agent.reload(load_config(files.config_path))
        await wait_for(lambda: "burn-b" in agent.status()["models"], what="burn-b held")
        assert reopened == ["models_reopened"]
        ref = ModelRef(name="burn-b", sha256=sha, size=source.stat().st_size)
        spec = burn_spec(fleet, "veh-models", rows=10)
        spec = spec.model_copy(update={"model": ref})
        await obs.send_job(signed(spec, fleet.job_key))
        await wait_for(lambda: "succeeded" in obs.kinds(), what="job on the installed model")
