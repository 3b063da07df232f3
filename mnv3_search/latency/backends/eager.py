"""torch eager, on the CPU and on the first CUDA device (FP32 only)."""

from __future__ import annotations

import io
import warnings
from typing import Optional

import torch
from torch import nn

from . import BackendBase, register_backend, torch_threads
from ..protocol import Runner


@register_backend
class TorchEagerBackend(BackendBase):
    """torch eager on CPU in inference mode, with the thread count pinned while the runner is called."""

    name = "torch"
    infers_on_caller = True  # with one thread torch computes on the caller
    file_suffix = ".pt"

    def runner(self, module: nn.Module, input_shape: tuple[int, ...]) -> Runner:
        module = module.eval()
        x = torch.randn(input_shape)

        def run() -> object:
            with torch_threads(self.threads), torch.inference_mode():
                return module(x)

        return run

    def model_file(self, module: nn.Module, input_shape: tuple[int, ...]) -> bytes:
        """A traced, frozen TorchScript file (what `torch.jit.load` on a device reads)."""
        buffer = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.freeze(torch.jit.trace(module.eval(), torch.randn(input_shape))).save(buffer)
        return buffer.getvalue()


@register_backend
class TorchCudaBackend(BackendBase):
    """torch eager on the first CUDA device; each run waits for the GPU so the time is the real latency."""

    name = "torch-cuda"

    @classmethod
    def unavailable(cls, precision: str = "fp32") -> Optional[str]:
        if torch.cuda.is_available():
            return None
        return ("backend torch-cuda needs a CUDA GPU and none is visible to torch here; "
                "use --backend onnxruntime or torch")

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__, "cuda": str(torch.version.cuda)}

    def fingerprint(self) -> dict[str, object]:
        from . import device_fingerprint

        return dict(device_fingerprint(cuda=True))

    def runner(self, module: nn.Module, input_shape: tuple[int, ...]) -> Runner:
        device = torch.device("cuda")
        module = module.eval().to(device)
        x = torch.randn(input_shape, device=device)

        def run() -> object:
            with torch.inference_mode():
                out = module(x)
            torch.cuda.synchronize()
            return out

        return run
