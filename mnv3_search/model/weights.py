"""Reading and writing checkpoints safely (weights_only) and checking they fit a spec before loading.

Accepts a bare state_dict (torchvision's format) or this tool's own checkpoint, a dict holding the
state_dict and the spec's YAML so the file says what network it belongs to.

Transfer: a checkpoint made for another class count (ImageNet's 1000, say) still seeds a network for the
user's classes. Only the final classifier layer may differ, and only in its output count; it then starts
fresh with torchvision's init and the caller is told so in one line. Any other mismatch is refused.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import yaml
from torch import nn

from ..errors import CheckpointError
from ..fileio import PathLike, atomic_write_bytes
from ..spec.arch import ArchSpec
from ..spec.yaml_io import spec_from_dict, spec_to_yaml

CHECKPOINT_FORMAT = "mnv3-search/1"
FINAL_LAYER = "classifier.3"  # the Linear hidden -> classes, in torchvision's layout and ours


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Load a checkpoint with torch.load(weights_only=True) and return its state_dict."""
    source = str(path)
    if not Path(path).is_file():
        raise CheckpointError(f"{source}: no such checkpoint file; pass --weights PATH to a .pt/.pth file")
    try:
        data: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{source}: not a readable PyTorch weights file ({first[:200]})") from None
    if isinstance(data, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(data.get(key), Mapping):
                data = data[key]
                break
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{source}: holds no state_dict (a mapping of parameter names to tensors)")
    return dict(data)


def check_fits(state_dict: Mapping[str, torch.Tensor], expected: Union[nn.Module, Mapping[str, tuple[int, ...]]],
               source: str, spec_name: str) -> None:
    """Raise one clear line for the first missing, unexpected or mis-shaped tensor.

    `expected` is the model the weights are for, or its state_dict's shapes by key."""
    if isinstance(expected, nn.Module):
        expected = {key: tuple(t.shape) for key, t in expected.state_dict().items()}
    for key, shape in expected.items():
        if key not in state_dict:
            raise CheckpointError(f"{source}: does not fit spec {spec_name}: tensor {key!r} is missing")
        got = tuple(state_dict[key].shape)
        if got != tuple(shape):
            raise CheckpointError(
                f"{source}: does not fit spec {spec_name}: tensor {key!r} has shape {got} in the checkpoint "
                f"but the spec needs {tuple(shape)}"
            )
    extra = [key for key in state_dict if key not in expected]
    if extra:
        raise CheckpointError(
            f"{source}: does not fit spec {spec_name}: unexpected tensor {extra[0]!r} "
            f"({len(extra)} extra in all); is it a checkpoint of another network?"
        )


def transfer_state_dict(state_dict: Mapping[str, torch.Tensor],
                        expected: Union[nn.Module, Mapping[str, tuple[int, ...]]], source: str,
                        spec_name: str) -> tuple[dict[str, torch.Tensor], Optional[str]]:
    """`state_dict` made to fit `expected`, and a one-line note when its final layer was replaced.

    When the final classifier layer differs only in its number of classes, it is replaced by a fresh one
    (torchvision's init: weight N(0, 0.01), bias 0, drawn from torch's global generator, so a seeded run
    repeats). Everything else must fit exactly: `check_fits` names the first tensor that does not."""
    if isinstance(expected, nn.Module):
        expected = {key: tuple(t.shape) for key, t in expected.state_dict().items()}
    weight, bias = f"{FINAL_LAYER}.weight", f"{FINAL_LAYER}.bias"
    result = dict(state_dict)
    note = None
    if all(k in result and k in expected for k in (weight, bias)):
        got, want = tuple(result[weight].shape), tuple(expected[weight])
        if (len(got) == len(want) == 2 and got[1] == want[1] and got[0] != want[0]
                and tuple(result[bias].shape) == (got[0],) and tuple(expected[bias]) == (want[0],)):
            fresh = torch.empty(want, dtype=result[weight].dtype)
            nn.init.normal_(fresh, 0.0, 0.01)
            result[weight] = fresh
            result[bias] = torch.zeros(want[0], dtype=result[bias].dtype)
            note = (f"{source}: made for {got[0]} classes, {spec_name} has {want[0]}: loaded every tensor but the "
                    f"final classifier layer {FINAL_LAYER}, which starts fresh (N(0, 0.01), bias 0)")
    check_fits(result, expected, source, spec_name)
    return result, note


def load_weights(model: nn.Module, path: PathLike, spec_name: str = "the spec") -> Optional[str]:
    """Check then load a checkpoint into `model` with strict=True; a checkpoint for another class count
    loads all but its final layer (see `transfer_state_dict`), and the returned note says so."""
    state_dict, note = transfer_state_dict(read_state_dict(path), model, str(path), spec_name)
    model.load_state_dict(state_dict, strict=True)
    return note


def save_state(state_dict: Mapping[str, torch.Tensor], spec: ArchSpec, path: PathLike) -> None:
    """Write a state_dict together with the spec's YAML, atomically."""
    payload = {"format": CHECKPOINT_FORMAT, "spec_yaml": spec_to_yaml(spec), "state_dict": dict(state_dict)}
    save_torch(payload, path)


def save_torch(obj: Any, path: PathLike) -> None:
    """torch.save, atomically. Serialised in memory first: torch's own file writer turns a full disk into an
    unhelpful RuntimeError ("unexpected pos"), Python's write into ENOSPC, which fileio says in one line."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getbuffer().tobytes())


def save_checkpoint(model: nn.Module, spec: ArchSpec, path: PathLike) -> None:
    """Write the model's weights together with the spec's YAML, atomically."""
    save_state(model.state_dict(), spec, path)


def load_torch(path: PathLike, what: str) -> Any:
    """torch.load (weights only) of a file this tool wrote; a missing or damaged one is a CheckpointError naming
    the file and `what` it should have been."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such {what} file") from None
    except Exception as exc:  # torch raises many types for truncated or corrupt files (zip, pickle, storage)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: truncated or damaged {what} ({first[:160]})") from None


def read_checkpoint(path: PathLike) -> tuple[ArchSpec, dict[str, torch.Tensor]]:
    """An own checkpoint: the spec it embeds and its state_dict (already checked to fit each other)."""
    data = load_torch(path, "checkpoint")
    if not isinstance(data, Mapping) or data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an mnv3-search checkpoint (no embedded spec)")
    state = data.get("state_dict")
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()) or \
            not isinstance(data.get("spec_yaml"), str):
        raise CheckpointError(f"{path}: damaged mnv3-search checkpoint (no state_dict or spec inside)")
    try:
        raw = yaml.safe_load(data["spec_yaml"])
    except yaml.YAMLError:
        raise CheckpointError(f"{path}: damaged mnv3-search checkpoint (its embedded spec is not YAML)") from None
    spec = spec_from_dict(raw, f"{path} (embedded spec)")
    return spec, dict(state)
