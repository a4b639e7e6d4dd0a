"""What an ONNX file asks of the runtime, read before any session is created.

Walks the protobuf wire format of a ModelProto (field numbers from onnx.proto) and
reports the operator domains it uses (opset imports and every node, in subgraphs and
functions too), whether any tensor keeps its data in an external file, and the graph's
inputs. The store refuses a model with external data (onnxruntime would open other
files by a path the model names) or with a domain outside the operator's allowlist
(custom and contrib operators are where crafted models have crashed runtimes).

Written by hand rather than with the `onnx` package: it needs eight message types and
a varint reader, it never copies tensor payloads, and it keeps protobuf and onnx (tens
of MB) off a Pi's daemon. Tests cross-check it against models built with `onnx`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from agent.core.admission import InputSpec

DEFAULT_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
MAX_DEPTH = 32  # nested subgraphs (If/Loop/Scan bodies) beyond this are refused

# TensorProto.DataType -> numpy dtype name (the ones a job tensor can carry).
ELEM_TYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    4: "uint16",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
    12: "uint32",
    13: "uint64",
}

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class ModelCheckError(Exception):
    """The file is not a well-formed ONNX model, or asks for something the store refuses."""


@dataclass(slots=True)
class ModelFacts:
    domains: set[str] = field(default_factory=set)
    external_data: list[str] = field(default_factory=list)  # tensor names
    inputs: dict[str, InputSpec] = field(default_factory=dict)
    has_graph: bool = False


def inspect_model(data: bytes) -> ModelFacts:
    """The facts of a serialized ModelProto; ModelCheckError if it cannot be parsed."""
    facts = ModelFacts()
    inputs: list[tuple[str, InputSpec | None]] = []
    initializers: set[str] = set()
    for num, value in _fields(memoryview(data)):
        if num == 8:  # opset_import
            facts.domains.add(_opset_domain(_msg(value)))
        elif num == 7:  # graph
            facts.has_graph = True
            _graph(_msg(value), facts, 0, inputs, initializers)
        elif num == 25:  # functions
            _function(_msg(value), facts, 0)
    if not facts.has_graph:
        raise ModelCheckError("no graph: not an ONNX model")
    for name, spec in inputs:
        if name in initializers:
            continue  # an initializer with a default, not a real input
        if spec is None:
            raise ModelCheckError(f"input {name!r} is not a tensor of a supported type")
        facts.inputs[name] = spec
    return facts


def check_model(data: bytes, allowed_domains: frozenset[str] = DEFAULT_DOMAINS) -> ModelFacts:
    """inspect_model, then refuse external data and domains outside `allowed_domains`."""
    facts = inspect_model(data)
    if facts.external_data:
        names = ", ".join(facts.external_data[:3])
        raise ModelCheckError(
            f"tensors keep their data in external files ({names}): the store takes "
            "self-contained models only"
        )
    extra = facts.domains - allowed_domains
    if extra:
        raise ModelCheckError(
            f"operator domain(s) {sorted(extra)} are not in the allowlist {sorted(allowed_domains)}"
            " (models.allowed_domains)"
        )
    return facts


# ---- messages ---------------------------------------------------------------


def _graph(
    buf: memoryview,
    facts: ModelFacts,
    depth: int,
    inputs: list[tuple[str, InputSpec | None]] | None = None,
    initializers: set[str] | None = None,
) -> None:
    if depth > MAX_DEPTH:
        raise ModelCheckError(f"subgraphs nested deeper than {MAX_DEPTH}")
    for num, value in _fields(buf):
        if num == 1:  # node
            _node(_msg(value), facts, depth)
        elif num == 5:  # initializer
            name = _tensor(_msg(value), facts)
            if initializers is not None:
                initializers.add(name)
        elif num == 15:  # sparse_initializer
            _sparse(_msg(value), facts)
        elif num == 11 and inputs is not None:  # input
            inputs.append(_value_info(_msg(value)))


def _function(buf: memoryview, facts: ModelFacts, depth: int) -> None:
    for num, value in _fields(buf):
        if num == 7:  # node
            _node(_msg(value), facts, depth)
        elif num == 9:  # opset_import
            facts.domains.add(_opset_domain(_msg(value)))


def _node(buf: memoryview, facts: ModelFacts, depth: int) -> None:
    domain = ""
    for num, value in _fields(buf):
        if num == 7:  # domain
            domain = _str(value)
        elif num == 5:  # attribute
            _attribute(_msg(value), facts, depth)
    facts.domains.add(domain)


def _attribute(buf: memoryview, facts: ModelFacts, depth: int) -> None:
    for num, value in _fields(buf):
        if num in (5, 10):  # t, tensors
            _tensor(_msg(value), facts)
        elif num in (6, 11):  # g, graphs
            _graph(_msg(value), facts, depth + 1)
        elif num in (22, 23):  # sparse_tensor, sparse_tensors
            _sparse(_msg(value), facts)


def _tensor(buf: memoryview, facts: ModelFacts) -> str:
    name = ""
    external = False
    for num, value in _fields(buf):
        if num == 8:
            name = _str(value)
        elif num == 13 or (num == 14 and value == 1):  # external_data, or location EXTERNAL
            external = True
    if external:
        facts.external_data.append(name or "(unnamed)")
    return name


def _sparse(buf: memoryview, facts: ModelFacts) -> None:
    for num, value in _fields(buf):
        if num in (1, 2):  # values, indices
            _tensor(_msg(value), facts)


def _value_info(buf: memoryview) -> tuple[str, InputSpec | None]:
    name, spec = "", None
    for num, value in _fields(buf):
        if num == 1:
            name = _str(value)
        elif num == 2:  # TypeProto
            for tnum, tvalue in _fields(_msg(value)):
                if tnum == 1:  # tensor_type
                    spec = _tensor_type(_msg(tvalue))
    return name, spec


def _tensor_type(buf: memoryview) -> InputSpec | None:
    elem, dims = 0, []
    for num, value in _fields(buf):
        if num == 1:
            elem = _int(value)
        elif num == 2:  # TensorShapeProto
            for dnum, dvalue in _fields(_msg(value)):
                if dnum == 1:  # Dimension
                    size: int | None = None
                    for knum, kvalue in _fields(_msg(dvalue)):
                        if knum == 1:
                            size = _int(kvalue)
                    dims.append(size)
    dtype = ELEM_TYPES.get(elem)
    return None if dtype is None else InputSpec(dtype, tuple(dims))


def _opset_domain(buf: memoryview) -> str:
    for num, value in _fields(buf):
        if num == 1:
            return _str(value)
    return ""


# ---- the wire format --------------------------------------------------------


def _fields(buf: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) pairs: an int for varints, a view for length-delimited fields;
    fixed-width fields are skipped (yielded as 0)."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if num == 0:
            raise ModelCheckError("field number 0: not a protobuf message")
        if wire == _VARINT:
            value, i = _varint(buf, i)
            yield num, value
        elif wire == _LEN:
            length, i = _varint(buf, i)
            if length > n - i:
                raise ModelCheckError("a field runs past the end of the file (truncated?)")
            yield num, buf[i : i + length]
            i += length
        elif wire in (_I64, _I32):
            i += 8 if wire == _I64 else 4
            if i > n:
                raise ModelCheckError("a fixed-width field runs past the end of the file")
            yield num, 0
        else:
            raise ModelCheckError(f"wire type {wire} is not used by ONNX")


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    result = shift = 0
    for _ in range(10):
        if i >= len(buf):
            raise ModelCheckError("a varint runs past the end of the file (truncated?)")
        byte = buf[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, i
        shift += 7
    raise ModelCheckError("a varint longer than 10 bytes")


def _msg(value: int | memoryview) -> memoryview:
    if not isinstance(value, memoryview):
        raise ModelCheckError("a message field holds a number")
    return value


def _str(value: int | memoryview) -> str:
    try:
        return bytes(_msg(value)).decode("utf-8")
    except UnicodeDecodeError:
        raise ModelCheckError("a string field is not UTF-8") from None


def _int(value: int | memoryview) -> int:
    if isinstance(value, memoryview):
        raise ModelCheckError("a number field holds bytes")
    return value - (1 << 64) if value >= 1 << 63 else value
