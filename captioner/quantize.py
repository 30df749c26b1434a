"""Dynamic int8 quantization for CPU inference: `quantize_model(model, "int8")`.

The weights of every LSTM/GRU/RNN and linear layer are stored as int8 and activations are
quantized on the fly at each call (`torch.ao.quantization.quantize_dynamic`, fbgemm/x86 kernels);
convolutions (the encoder) stay in float. A quantized model runs on the CPU only and is not saved:
model folders hold the float weights, and `Captioner.load` / `Answerer.load` quantize on loading.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection

import torch
from torch import nn

QUANTIZE_MODES = ("int8",)
_DYNAMIC = (nn.Linear, nn.LSTMCell, nn.GRUCell, nn.RNNCell, nn.LSTM, nn.GRU)
# Layers whose forward reads their linear layers' weights as tensors (the transformer fast
# path): their insides stay in float. They run once per image, not once per word.
_KEEP_FLOAT = (nn.TransformerEncoderLayer, nn.MultiheadAttention)


def check_quantize(quantize: str | None, device: str | torch.device = "cpu") -> None:
    """A ValueError naming the bad value unless `quantize` is None or a mode this device runs."""
    if quantize is None:
        return
    if quantize not in QUANTIZE_MODES:
        raise ValueError(
            f"quantize must be one of {', '.join(QUANTIZE_MODES)} or None, got {quantize!r}"
        )
    if torch.device(device).type != "cpu":
        raise ValueError(f"quantize={quantize!r} runs on the CPU only, got device {str(device)!r}")


def quantize_model(model: nn.Module, quantize: str | None, skip: Collection[str] = ()) -> nn.Module:
    """`model` (in eval mode) with its recurrent and linear layers quantized to int8 weights
    (those inside transformer layers stay in float: see `_KEEP_FLOAT`); `skip` names submodules
    (as in `named_modules`) to keep in float, e.g. a layer whose weight the model reads
    directly. `quantize=None` returns the model unchanged."""
    check_quantize(quantize)
    if quantize is None:
        return model
    model = model.eval()
    inside_float = [
        name + "." for name, module in model.named_modules() if isinstance(module, _KEEP_FLOAT)
    ]
    names = {
        name
        for name, module in model.named_modules()
        if isinstance(module, _DYNAMIC)
        and name not in skip
        and not any(name.startswith(prefix) for prefix in inside_float)
    }
    spec = {name: torch.ao.quantization.default_dynamic_qconfig for name in names}
    with warnings.catch_warnings():
        # torch.ao.quantization and its quantized tensors are deprecated for torchao, whose
        # dynamic int8 has no LSTM/GRU/RNN cells; the deprecation notices are all they say.
        warnings.filterwarnings("ignore", message=".*deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*deprecated", category=UserWarning)
        return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)
