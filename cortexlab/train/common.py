"""What every training recipe shares: atomic JSON and folder writes, the git revision and the environment."""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["environment", "fsync_dir_files", "git_revision", "jsonable", "load_optimizer", "save_optimizer",
           "write_json_atomic"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path) -> None:
    """Give a file (or folder) made by `tempfile` (0600 / 0700) the usual permissions (0644 / 0755 less umask)."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


def fsync_dir_files(path: Path) -> None:
    """fsync every file in `path` and give it and the folder the usual permissions."""
    for file in filter(Path.is_file, path.iterdir()):
        with open(file, "rb") as f:
            os.fsync(f.fileno())
        _publish_mode(file)
    _publish_mode(path)


def write_json_atomic(path: Path, data) -> None:
    """Write `data` as indented JSON to `path`: a temp file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _publish_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def git_revision(*, refresh: bool = False) -> dict:
    """{"commit": HEAD, "dirty": uncommitted changes to tracked files} of the checkout cortexlab runs from, as it
    was at the first call or the last one with refresh=True. The command lines refresh it as they start, so a
    results file names the code that ran even when the checkout moves on during a long run."""
    if refresh:
        _revision_at_first_call.cache_clear()
    commit, dirty = _revision_at_first_call()
    return {"commit": commit, "dirty": dirty}


@functools.cache
def _revision_at_first_call() -> tuple[str | None, bool | None]:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, check=True).stdout.strip())
        return rev, dirty
    except (OSError, subprocess.CalledProcessError):
        return None, None


def environment() -> dict:
    """Versions and machine facts recorded beside every result."""
    import accelerate
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "torch_threads": torch.get_num_threads(),
            "machine": platform.machine(), "cpu_count": os.cpu_count()}


def jsonable(x):
    """`x` as it reads back from JSON (tuples become lists), for comparing configs with saved ones."""
    return json.loads(json.dumps(x, default=list))


def save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> list[dict]:
    """Write the optimizer's tensors (moments, steps) to `path` (safetensors); returns its param groups as JSON data."""
    opt = optimizer.state_dict()
    tensors = {f"{i}.{name}": t.detach().cpu().contiguous() for i, s in opt["state"].items()
               for name, t in s.items() if isinstance(t, torch.Tensor)}
    save_file(tensors, path)
    return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt["param_groups"]]


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path, param_groups: list[dict]) -> None:
    """Inverse of `save_optimizer`: the tensors from `path`, the groups from the JSON data it returned."""
    state: dict = {}
    for key, t in load_file(path).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = t
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in param_groups]
    optimizer.load_state_dict({"state": state, "param_groups": groups})



@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module):
    """`model` and all its submodules in eval mode inside the block (yields `model`); afterwards, also on error,
    each module back in its own mode, so a frozen base kept in eval mode while its sidecar trains stays there."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes.items():
            module.train(mode)


def int_tuple(text: str) -> tuple[int, ...]:
    """A command line's comma-separated ints: "1,8,16" -> (1, 8, 16) (empty items skipped, "" -> ())."""
    return tuple(int(x) for x in text.split(",") if x)


def warmup_cosine_lr(step: int, lr: float, steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay from lr towards min_lr_ratio * lr, which step
    index `steps` (one past the last step of a run) would reach."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def publish_dir_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` fills a temp folder beside `path`; fsync it, then rename it onto `path` (an old one is replaced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        fsync_dir_files(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def write_checkpoint(directory, step: int, optimizer: torch.optim.Optimizer, state: dict,
                     write_weights: Callable[[Path], None], keep: int = 2) -> Path:
    """Write `directory/step-XXXXXX/`: the weights (`write_weights(folder)`), optimizer.safetensors and
    trainer_state.json (`state` with the step), in a temporary folder that is fsynced and renamed into place; then
    point `latest.json` at it and remove all but the newest `keep` checkpoints."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=directory))
    try:
        write_weights(tmp)
        groups = save_optimizer(optimizer, tmp / "optimizer.safetensors")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "param_groups": groups, **state}))
        fsync_dir_files(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json_atomic(directory / "latest.json", {"checkpoint": target.name, "step": step})
    for old in sorted(directory.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def read_checkpoint(directory, optimizer: torch.optim.Optimizer,
                    read_weights: Callable[[Path], None]) -> dict | None:
    """Load the checkpoint `latest.json` points at: the weights (`read_weights(folder)`) and the optimizer; returns
    its trainer state, or None when `directory` holds no checkpoint."""
    pointer = Path(directory) / "latest.json"
    if not pointer.is_file():
        return None
    target = Path(directory) / json.loads(pointer.read_text())["checkpoint"]
    read_weights(target)
    state = json.loads((target / "trainer_state.json").read_text())
    load_optimizer(optimizer, target / "optimizer.safetensors", state.pop("param_groups"))
    return state
