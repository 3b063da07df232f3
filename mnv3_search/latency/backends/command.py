"""A device reached by a command (`--runner`): the tool writes the model file, the command times it there.

The command is a template, e.g. `adb shell /data/local/tmp/run {model} {runs}` or `ssh pi ./time.sh {model}`,
split like a shell line (no shell runs it: wrap it in `sh -c '...'` for pipes). Placeholders, replaced in every
word: `{model}` (required) the path of the model file written here, `{runs}` how many timed runs are wanted,
`{warmup}` how many untimed runs should come first, `{threads}` --threads. The file is the wrapped backend's
(`model_file`): ONNX for onnxruntime (QDQ INT8 at --precision int8), .pte for executorch, TorchScript for torch.
Copying it to the device is the command's job (e.g. a script that runs `adb push` first).

What the command prints on stdout, one item a line (`parse_output`):

    device: Pixel 7 (Tensor G2)     optional, once: names the device; the table is keyed by it
    4.213                           one timed run's latency in milliseconds (a trailing "ms" is allowed)
    # anything                      a comment; blank lines are ignored too

Anything else is refused, as are a missing command, a non-zero exit status and output without a timing: one
line naming the problem, exit status 2. A command that does not print `device:` needs `--runner-device NAME`.
The device's name replaces this machine's fingerprint in the table's header, and the backend is recorded as
`runner:<backend>`, so a device's table never mixes with this machine's or another device's.
"""

from __future__ import annotations

import math
import re
import shlex
import subprocess
import tempfile
import weakref
from pathlib import Path
from typing import Optional

from torch import nn

from ...errors import UserError
from . import BackendBase
from ..protocol import Runner

PLACEHOLDERS = ("{model}", "{runs}", "{warmup}", "{threads}")
WARMUP_RUNS = 3  # what `{warmup}` asks for: as many as the interleaved protocol gives a local runner
TIMEOUT_S = 600.0  # one call of the command; a device that hangs should not hang a NetAdapt run for ever
_NUMBER = re.compile(r"^([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(?:ms)?$")


def parse_output(text: str, program: str = "the runner") -> tuple[Optional[str], list[float]]:
    """(the device the output names or None, each run's milliseconds) from a runner's stdout; a line that is
    neither is a UserError naming it."""
    device: Optional[str] = None
    runs: list[float] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.lower().startswith("device:"):
            name = line.split(":", 1)[1].strip()
            if not name or (device is not None and name != device):
                raise UserError(f"--runner: {program} named its device {name!r} on line {number}"
                                + (f" after {device!r}" if device else "") + "; print 'device: NAME' once")
            device = name
            continue
        match = _NUMBER.match(line)
        value = float(match.group(1)) if match else math.nan
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"--runner: {program} printed {line[:60]!r} on line {number}, not a run's "
                            f"milliseconds (one positive number a line) or 'device: NAME'")
        runs.append(value)
    return device, runs


class CommandRunner:
    """One model file and the command that times it (`SelfTimed`); the file lives as long as this object."""

    def __init__(self, backend: "CommandBackend", model: bytes) -> None:
        self.backend = backend
        self._folder = tempfile.TemporaryDirectory(prefix="mnv3-runner-")
        weakref.finalize(self, self._folder.cleanup)
        self.path = Path(self._folder.name) / f"model{backend.inner.file_suffix}"
        self.path.write_bytes(model)

    def timed(self, runs: int) -> list[float]:
        device, times = self.backend.call(self.path, runs)
        self.backend.check_device(device)
        return times

    def __call__(self) -> object:  # a runner is callable; a self-timed one is asked through `timed`
        return self.timed(1)


class CommandBackend(BackendBase):
    """`inner`'s model files timed by a command on the device it reaches (see the module docstring)."""

    infers_on_caller = False  # the time is the device's own, reported by the command

    def __init__(self, inner: BackendBase, command: str, device: Optional[str] = None) -> None:
        super().__init__(inner.threads, inner.precision)
        if inner.file_suffix is None:
            raise UserError(f"--runner: backend {inner.name} writes no model file a device can run; use "
                            f"--backend onnxruntime, executorch or torch")
        try:
            self.argv = shlex.split(command)
        except ValueError as exc:
            raise UserError(f"--runner {command!r}: {exc}") from None
        if not self.argv or not any("{model}" in word for word in self.argv):
            raise UserError(f"--runner {command!r}: the command must contain {{model}}, where the model file's "
                            f"path goes")
        self.inner = inner
        self.command = command
        self.name = f"runner:{inner.name}"
        self.torch_matters = inner.torch_matters
        self.file_suffix = inner.file_suffix
        self._given = device.strip() if device else None
        if device is not None and not self._given:
            raise UserError("--runner-device: give the device a name")
        self._reported: Optional[str] = None

    @property
    def program(self) -> str:
        return Path(self.argv[0]).name

    def versions(self) -> dict[str, str]:
        return self.inner.versions()

    def call(self, path: Path, runs: int) -> tuple[Optional[str], list[float]]:
        """Run the command on the file at `path` for `runs` timed runs; (device named, run times in ms)."""
        values = {"{model}": str(path), "{runs}": str(runs), "{warmup}": str(WARMUP_RUNS),
                  "{threads}": str(self.threads)}
        argv = []
        for word in self.argv:
            for placeholder, value in values.items():
                word = word.replace(placeholder, value)
            argv.append(word)
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise UserError(f"--runner: command {self.argv[0]!r} not found") from None
        except PermissionError:
            raise UserError(f"--runner: command {self.argv[0]!r} is not executable") from None
        except subprocess.TimeoutExpired:
            raise UserError(f"--runner: {self.program} did not finish within {TIMEOUT_S:.0f} s") from None
        if done.returncode != 0:
            last = next((line.strip() for line in reversed(done.stderr.splitlines()) if line.strip()), "")
            raise UserError(f"--runner: {self.program} exited with status {done.returncode}"
                            + (f": {last[:160]}" if last else " and printed nothing on stderr"))
        device, times = parse_output(done.stdout, self.program)
        if not times:
            raise UserError(f"--runner: {self.program} printed no run's milliseconds (one number a line)")
        return device, times

    def check_device(self, reported: Optional[str]) -> None:
        """The device a call named must be the one the table is keyed by."""
        if reported is None:
            return
        if self._given is not None and reported != self._given:
            raise UserError(f"--runner: {self.program} says it runs on {reported!r} but --runner-device says "
                            f"{self._given!r}; drop --runner-device or make them agree")
        if self._reported is not None and reported != self._reported:
            raise UserError(f"--runner: {self.program} said it runs on {self._reported!r}, now {reported!r}")
        self._reported = reported

    def device_name(self) -> str:
        """--runner-device, else the name the command prints, asked once on a tiny model (which also checks that
        the command works before any real work)."""
        if self._given is not None:
            return self._given
        if self._reported is None:
            probe = CommandRunner(self, self.inner.model_file(_probe_module(), (1, 8, 8, 8)))
            device, _ = self.call(probe.path, 1)
            if device is None:
                raise UserError(f"--runner: {self.program} does not name its device (print 'device: NAME'); "
                                f"give --runner-device NAME")
            self.check_device(device)
        assert self._reported is not None
        return self._reported

    def fingerprint(self) -> dict[str, object]:
        return {"device": self.device_name()}

    def model_file(self, module: nn.Module, input_shape: tuple[int, ...]) -> bytes:
        return self.inner.model_file(module, input_shape)

    def runner(self, module: nn.Module, input_shape: tuple[int, ...]) -> Runner:
        return CommandRunner(self, self.model_file(module, input_shape))


def _probe_module() -> nn.Module:
    """The smallest real model every backend can convert: one 1x1 convolution."""
    return nn.Sequential(nn.Conv2d(8, 8, 1)).eval()
