"""Regenerates the small ONNX models the project ships, and their manifest.

The digit classifier is trained on scikit-learn's bundled 8x8 digits set (no
download), exported with skl2onnx, and shipped with its held-out split so that
the demo can check the accuracy of predictions that came back encrypted.

Run: .venv/bin/python models/build_models.py   (needs the `models` extra)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent
SEED = 20261130


def _digest(path: Path) -> dict[str, object]:
    data = path.read_bytes()
    return {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def build_digits() -> dict[str, object]:
    digits = load_digits()
    x = digits.data.astype(np.float32)  # 0..16 per pixel
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=SEED, stratify=y
    )
    x_train, x_test = x_train / np.float32(16.0), x_test / np.float32(16.0)
    clf = LogisticRegression(max_iter=2000, C=0.5)
    clf.fit(x_train, y_train)
    onx = to_onnx(
        clf,
        x_train[:1],
        options={id(clf): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    onx.doc_string = "digits-logreg: 8x8 digit classifier; input pixels scaled to 0..1"
    model_path = HERE / "digits.onnx"
    model_path.write_bytes(onx.SerializeToString())
    holdout = HERE / "digits_holdout.npz"
    np.savez_compressed(holdout, x=x_test.astype(np.float32), y=y_test)
    accuracy = float((clf.predict(x_test) == y_test).mean())
    return {
        "name": "digits",
        **_digest(model_path),
        "inputs": {"X": {"dtype": "float32", "shape": [None, 64]}},
        "outputs": ["label", "probabilities"],
        "holdout": {**_digest(holdout), "samples": len(y_test)},
        "holdout_accuracy": round(accuracy, 4),
    }


def build_burn() -> dict[str, object]:
    """A compute-bound model whose run time the job chooses: `rows` copies of `x` go through a
    chain of 32 MatMul+Tanh layers (256x256). About 4 MFLOP per row; used to test preemption,
    deadlines and the power governor with real onnxruntime work."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.RandomState(SEED)
    weight = (rng.standard_normal((256, 256)) / 16.0).astype(np.float32)
    nodes = [helper.make_node("Expand", ["x", "rows_by_256"], ["h0"])]
    for i in range(32):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "W"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("ReduceSum", ["h32", "axis0"], ["y"], keepdims=0))
    graph = helper.make_graph(
        nodes,
        "burn",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256]),
            helper.make_tensor_value_info("rows_by_256", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [256])],
        initializer=[
            numpy_helper.from_array(weight, "W"),
            numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edge-agent"
    )
    model.ir_version = 8
    path = HERE / "burn.onnx"
    path.write_bytes(model.SerializeToString())
    return {
        "name": "burn",
        **_digest(path),
        "inputs": {
            "x": {"dtype": "float32", "shape": [1, 256]},
            "rows_by_256": {"dtype": "int64", "shape": [2]},
        },
        "outputs": ["y"],
    }


def main() -> None:
    manifest = {"version": 1, "models": [build_digits(), build_burn()]}
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
