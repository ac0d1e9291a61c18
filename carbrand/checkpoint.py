"""Checkpoints and exports in the run directory, written atomically and read without pickle.

    RUN/checkpoints/step_<n>/   model.safetensors  [ema.safetensors]  training_state.pt  config.yaml  classes.json
    RUN/best/                   model.safetensors  classes.json  config.yaml   (an export)
    RUN/last -> checkpoints/step_<n>

Both also hold car_models.json when the network was trained on car models (data.labels:
car_model): its head then has one output per car model, and load_export_model sums them
into the brands of classes.json, so every reader of an export answers brands.

Every directory is first written under a hidden temporary name and renamed when complete,
so a crash mid-save leaves either the old state or the new one, never a half. Weights are
safetensors; the training state (optimizer, scheduler, scaler, counters, the EMA's update
count) is a torch file read back with `weights_only=True`. On a resume, rank 0 alone lists
the checkpoints and every rank loads the one it picked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.utils import broadcast_object_list, gather_object
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file, save_file

from carbrand.car_models import CAR_MODELS_FILE, CarModel, brand_indices, car_models_from_json, car_models_json
from carbrand.config import Config, config_from_dict, safe_yaml_load, save_config
from carbrand.errors import CarbrandError, ConfigError, first_line
from carbrand.filesystem import (read_directory_consistently, restore_interrupted_swap, warn_if_short_of_space,
                                 write_directory_atomically)
from carbrand.model import answer_brands, build_model, load_classifier_state
from carbrand.weights import load_failure_reason, safe_torch_load, strip_wrapper_prefixes

STEP_PATTERN = re.compile(r"^step_(\d+)$")
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "training_state.pt"
EXPORT_FILES = (MODEL_FILE, "classes.json", "config.yaml")


@dataclass
class Export:
    directory: Path
    state_dict: dict[str, torch.Tensor]
    classes: list[str]
    config: Config
    car_models: list[CarModel] | None = None  # the head's outputs, when it was trained on car models

    @property
    def num_outputs(self) -> int:
        return len(self.car_models) if self.car_models is not None else len(self.classes)


def plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous, un-prefixed tensors: what safetensors and every reader expect."""

    return {strip_wrapper_prefixes(k): v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_export(directory: Path, state_dict: dict[str, torch.Tensor], classes: list[str], config: Config,
                car_models: list[CarModel] | None = None) -> Path:
    def write(into: Path) -> None:
        outputs = len(car_models) if car_models is not None else len(classes)
        save_file(state_dict, str(into / MODEL_FILE), metadata={"arch": config.model.arch, "num_classes": str(outputs)})
        write_labels(into, classes, car_models)
        save_config(config, into / "config.yaml")

    return write_directory_atomically(directory, write)


def write_labels(into: Path, classes: list[str], car_models: list[CarModel] | None) -> None:
    (into / "classes.json").write_text(json.dumps(classes, indent=2, ensure_ascii=False) + "\n")
    if car_models is not None:
        (into / CAR_MODELS_FILE).write_text(car_models_json(car_models))


def load_export(directory: str | Path) -> Export:
    """Read an export (best/, a step checkpoint, or a copy) with one-line errors for anything off.

    The files are read as one version even while training replaces best/ (read_directory_consistently).
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CarbrandError(f"checkpoint {directory} is a file; expected an export directory such as RUN/best")
    try:
        files = read_directory_consistently(directory, (*EXPORT_FILES, CAR_MODELS_FILE))
    except (FileNotFoundError, NotADirectoryError):
        raise CarbrandError(f"checkpoint not found: {directory} (expected a directory such as RUN/best)") from None
    missing = [name for name in EXPORT_FILES if files[name] is None]
    if missing:
        raise CarbrandError(f"{directory} is not a carbrand export: missing {', '.join(missing)}")
    try:
        state_dict = load_safetensors_bytes(files[MODEL_FILE])
    except Exception:
        raise CarbrandError(f"{directory / MODEL_FILE} is not a valid safetensors file") from None
    try:
        classes = json.loads(files["classes.json"])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CarbrandError(f"{directory / 'classes.json'} is not valid JSON") from None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise CarbrandError(f"{directory / 'classes.json'} must be a non-empty list of brand names")
    try:
        raw = safe_yaml_load(files["config.yaml"].decode("utf-8"))
        config = config_from_dict(raw or {})
    except (yaml.YAMLError, ConfigError, UnicodeDecodeError) as error:
        # YAML errors add a source excerpt after the first line
        raise CarbrandError(f"{directory / 'config.yaml'} is not a valid carbrand config ({first_line(error)})") from None
    car_models = None
    if files[CAR_MODELS_FILE] is not None:
        try:
            car_models = car_models_from_json(json.loads(files[CAR_MODELS_FILE]), classes, str(directory / CAR_MODELS_FILE))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CarbrandError(f"{directory / CAR_MODELS_FILE} is not valid JSON") from None
    return Export(directory=directory, state_dict=state_dict, classes=classes, config=config, car_models=car_models)


def load_export_model(directory: str | Path) -> tuple[torch.nn.Module, Export]:
    """The exported classifier, on the CPU in eval mode, checked against its own config; it answers brands."""
    export = load_export(directory)
    model = build_model(export.config.model.arch, export.num_outputs, pretrained="none")
    load_classifier_state(model, export.state_dict, str(export.directory / MODEL_FILE))
    if export.car_models is not None:
        answer_brands(model, brand_indices(export.car_models, export.classes), len(export.classes))
    return model.eval(), export


# ----------------------------------------------------------------------------- training checkpoints


def step_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints, oldest first. Temporary (hidden) directories never match."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = STEP_PATTERN.match(child.name)
        if match and child.is_dir() and all((child / f).is_file() for f in (MODEL_FILE, STATE_FILE)):
            found.append((int(match.group(1)), child))
    return sorted(found)


def save_training_checkpoint(
    run_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor] | None,
    training_state: dict[str, Any],
    classes: list[str],
    config: Config,
    keep: int,
    car_models: list[CarModel] | None = None,
) -> Path:
    def write(into: Path) -> None:
        save_file(model_state, str(into / MODEL_FILE))
        if ema_state is not None:
            save_file(ema_state, str(into / EMA_FILE))
        torch.save(training_state, into / STATE_FILE)
        write_labels(into, classes, car_models)
        save_config(config, into / "config.yaml")

    existing = step_checkpoints(run_dir)
    warn_if_short_of_space(run_dir, existing[-1][1] if existing else None, [model_state, ema_state, training_state])
    final = write_directory_atomically(run_dir / "checkpoints" / f"step_{step}", write)
    try:
        _point_last_at(run_dir, final)
    except OSError as error:
        raise CarbrandError(f"could not point {run_dir / 'last'} at {final} ({error.strerror or error})") from None
    for _, old in step_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    _remove_crash_leftovers(final.parent)
    return final


def recover_run_dir_after_crash(run_dir: Path) -> None:
    """Under the run lock (no other writer): best/ put back if a save killed mid-swap left only its `.old-` copy,
    then that save's temporaries removed. Else a resumed run that never beats the lost best score would end
    with no best/ and export its last weights in its place."""
    restore_interrupted_swap(run_dir / "best")
    if run_dir.is_dir():
        _remove_crash_leftovers(run_dir)


def _remove_crash_leftovers(folder: Path) -> None:
    """Temporaries of a save that a crash or kill -9 interrupted (another process id): never resumed from, only space."""
    ours = f"-{os.getpid()}"
    for child in folder.iterdir():
        if child.name.startswith((".tmp-", ".old-")) and not child.name.endswith(ours):
            shutil.rmtree(child, ignore_errors=True)


def _point_last_at(run_dir: Path, target: Path) -> None:
    link = run_dir / "last"
    temporary = run_dir / f".last-{os.getpid()}"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(target.relative_to(run_dir))
    os.replace(temporary, link)  # atomic: `last` always names a complete checkpoint


@dataclass
class TrainingCheckpoint:
    directory: Path
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor] | None
    training_state: dict[str, Any]


def load_training_checkpoint(directory: Path) -> TrainingCheckpoint:
    if not (directory / MODEL_FILE).is_file() or not (directory / STATE_FILE).is_file():
        raise CarbrandError(f"{directory} is not a complete training checkpoint (needs {MODEL_FILE} and {STATE_FILE})")
    try:
        model_state = load_file(str(directory / MODEL_FILE))
        ema_state = load_file(str(directory / EMA_FILE)) if (directory / EMA_FILE).is_file() else None
        # weights_only: a checkpoint from elsewhere can never run code while loading.
        training_state = safe_torch_load(directory / STATE_FILE)
    except Exception as error:
        raise CarbrandError(f"{directory} cannot be loaded safely ({load_failure_reason(error)})") from None
    return TrainingCheckpoint(directory, model_state, ema_state, training_state)


def find_resume_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """`train.resume`: auto -> newest complete checkpoint or None; never -> None; PATH -> that, or an error."""
    if resume == "never":
        return None
    if resume == "auto":
        found = step_checkpoints(run_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"config key 'train.resume' names {path}, which does not exist")
    return path


def agreed_resume_checkpoint(accelerator, run_dir: Path, resume: str) -> Path | None:
    """`find_resume_checkpoint` on rank 0 only, its answer (or its error) sent to every rank.

    Ranks listing the shared file system each for itself can see different newest checkpoints
    (a stale directory cache on one node) and resume from different steps: the job splits.
    """
    answer: list = [None]
    if accelerator.is_main_process:
        try:
            answer = [find_resume_checkpoint(run_dir, resume)]
        except CarbrandError as error:  # raised on every rank below, so that none waits for the others
            answer = [error]
    if accelerator.num_processes > 1:
        broadcast_object_list(answer, from_process=0)
    if isinstance(answer[0], CarbrandError):
        raise answer[0]
    return answer[0]


def load_resume_checkpoint(accelerator, directory: Path) -> TrainingCheckpoint:
    """Every rank reads the checkpoint rank 0 picked; if one cannot, all stop with one line naming it and the rank."""
    checkpoint, problem = None, None
    try:
        checkpoint = load_training_checkpoint(directory)
    except CarbrandError as error:
        problem = str(error)
    problems = gather_object([problem]) if accelerator.num_processes > 1 else [problem]  # one per rank
    failed = [rank for rank, text in enumerate(problems) if text is not None]
    if len(failed) == len(problems):
        raise CarbrandError(problems[0])  # the same checkpoint fails everywhere: the plain reason
    if failed:
        rank = failed[0]
        raise CarbrandError(f"rank {rank} of {len(problems)} cannot read {directory}, the resume checkpoint rank 0 picked "
                            f"({problems[rank]}); does every node see the same {directory.parent}?")
    return checkpoint
