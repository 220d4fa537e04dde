"""Export the ONNX test fixtures in tests/data/onnx/ with PyTorch's real exporters.

Needs torch (2.13 used) and onnxscript (for the dynamo exporter); advkern itself never does.
Run from the repository root: ``python scripts/make_onnx_fixtures.py``.

Models (torch.manual_seed(0)), each exported with the legacy TorchScript exporter
(``dynamo=False``) and the torch.export-based one (``dynamo=True``), input (N, 1, 28, 28)
with a dynamic batch axis:

- ``mlp``: Flatten -> Linear(784, 256) -> ReLU -> Linear(256, 256) -> ReLU -> Linear(256, 10);
- ``cnn``: Conv2d(1, 16, 3, padding 1) -> ReLU -> Conv2d(16, 32, 3, stride 2) -> ReLU
  -> Conv2d(32, 64, 3, stride 2) -> ReLU -> Flatten -> Linear(2304, 10);
- ``small``: Conv2d(1, 4, 3) -> Tanh -> MaxPool2d(2) -> ``h.view(h.size(0), -1)`` -> Sigmoid
  -> Dropout -> ``h @ w + b`` -> Softmax: the patterns beyond Gemm/Flatten (MatMul + Add,
  Shape-computed Reshape, MaxPool, a trailing Softmax); also exported by dynamo with
  ``optimize=False`` (Shape/Squeeze/Concat nodes, Constant nodes, Identity).

Every file is self-contained (``external_data=False``: dynamo's default writes a ``.data``
file next to even a tiny model). ``expected.npz`` holds ``x`` (4 images from
``default_rng(0)``) and, per model, the PyTorch logits (for ``small``, the scores before the
softmax, ``small_logits``, and the probabilities, ``small_probs``).
"""

import os
import sys
import warnings

import numpy as np
import onnx
import torch
import torch.nn as nn

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "onnx")


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256),
                         nn.ReLU(), nn.Linear(256, 10))


def cnn():
    return nn.Sequential(nn.Conv2d(1, 16, 3, stride=1, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=0), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64 * 6 * 6, 10))


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(0.5)
        self.w = nn.Parameter(torch.randn(4 * 13 * 13, 10) * 0.05)
        self.b = nn.Parameter(torch.randn(10) * 0.1)

    def scores(self, x):
        h = self.pool(torch.tanh(self.conv(x)))
        h = h.view(h.size(0), -1)
        return self.drop(torch.sigmoid(h)) @ self.w + self.b

    def forward(self, x):
        return torch.softmax(self.scores(x), dim=1)


def export(model, x, name, dynamo, **kw):
    path = os.path.join(OUT, name + ".onnx")
    if dynamo:
        torch.onnx.export(model, (x,), path, dynamo=True, external_data=False,
                          input_names=["x"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("N")},), **kw)
    else:
        torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"],
                          output_names=["logits"],
                          dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}}, **kw)
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in proto.graph.initializer)
    assert not os.path.exists(path + ".data"), "external data written"
    print(f"{name}.onnx: {os.path.getsize(path)} bytes, ops "
          f"{' '.join(n.op_type for n in proto.graph.node)}")


def main():
    os.makedirs(OUT, exist_ok=True)
    warnings.filterwarnings("ignore")
    x_np = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    x = torch.from_numpy(x_np)
    expected = {"x": x_np}
    torch.manual_seed(0)
    models = {"mlp": mlp().eval(), "cnn": cnn().eval(), "small": Small().eval()}
    with torch.no_grad():
        for name, model in models.items():
            export(model, x, f"{name}_legacy", dynamo=False)
            export(model, x, f"{name}_dynamo", dynamo=True)
            if name == "small":
                export(model, x, "small_dynamo_noopt", dynamo=True, optimize=False)
                expected["small_logits"] = model.scores(x).numpy()
                expected["small_probs"] = model(x).numpy()
            else:
                expected[name] = model(x).numpy()
    expected["torch_version"] = np.array(torch.__version__)
    np.savez(os.path.join(OUT, "expected.npz"), **expected)
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"total {total} bytes in {os.path.normpath(OUT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
