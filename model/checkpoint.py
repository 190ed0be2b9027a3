"""Checkpoints: the payload's one home; written atomically, read with ``weights_only=True`` (a checkpoint
never runs code).

A payload is a dict of tensors and plain data: ``model`` (the weights, plain keys), ``model_name``,
``classes`` (label codes in class-index order), ``class_counts`` (positives per class in the train
split: inference's fallback labels), ``decision_rule`` (the tune stage's, or None), ``stage``,
``epoch`` (finished epochs), ``step``, ``metric``, ``best_metric``, ``config``, ``holdout`` (the tune stage's:
which images its rule was chosen on, ``common.tune_split.holdout_fingerprint``; None for the train stage);
``lr_schedule`` (the stage's learning-rate schedule, a record: the rate is a function of the epoch, so there is no
scheduler state); and, to resume training exactly, ``optimizer``, ``scaler``, ``rng`` (rank 0's random state)
and ``rng_per_rank`` (every rank's, in rank order: each rank's dropout and other draws go on from its own),
``epoch_progress`` (how far into the next epoch a mid-epoch checkpoint stands, with the epoch's running sums) and
``dali`` (every rank's DALI
pipeline checkpoint, in rank order, for a world of ``world_size`` processes, with ``dali_graph``, the description of
the train graph it was saved by: ``dali_pipes.loader.train_graph``).
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from common.atomic import atomic_write
from common.errors import UserError
from model.network import create_model, unwrap


RESUME_ONLY = ("optimizer", "scheduler", "lr_schedule", "scaler", "rng", "rng_per_rank", "epoch_progress", "dali",
               "dali_graph")


def for_inference(state: dict) -> dict:
    """A payload without what only resuming training needs (the optimiser's momentum is as large as the
    weights): what a submission keeps in memory per model."""
    return {k: v for k, v in state.items() if k not in RESUME_ONLY}


def rng_state() -> dict:
    """Every random generator a training step touches, as plain tensors and lists."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def cuda_states_to_restore(saved: list, visible: int) -> list[tuple[int, torch.Tensor]]:
    """(device index, state) for the GPUs this process has: a checkpoint saved where 8 GPUs were visible
    resumes where there is one (each process seeing only its own), and one saved on 1 GPU where there are 8."""
    return [(i, saved[i]) for i in range(min(len(saved), visible))]


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if state.get("cuda") and torch.cuda.is_available():
        for index, cuda_state in cuda_states_to_restore(state["cuda"], torch.cuda.device_count()):
            torch.cuda.set_rng_state(cuda_state, index)


def rank_rng_state(saved: dict, rank: int, world_size: int) -> dict:
    """The random state this rank resumes with: its own where the checkpoint was saved by as many ranks (older
    checkpoints hold rank 0's only), else rank 0's (another world draws other numbers anyway)."""
    per_rank = saved.get("rng_per_rank")
    if per_rank and saved.get("world_size") == world_size and len(per_rank) == world_size:
        return per_rank[rank]
    return saved["rng"]


def restore_scaler(scaler: torch.amp.GradScaler, state: dict) -> None:
    """The GradScaler's state; an empty one (saved by a disabled scaler: a bf16 or CPU run) leaves an fp16
    run's fresh scaler as it is (GradScaler refuses to load it), which then finds its scale in a few steps."""
    if state:
        scaler.load_state_dict(state)


def save_checkpoint(path: Path, payload: dict) -> None:
    with atomic_write(path, "wb") as f:
        torch.save(payload, f)


FOR_INFERENCE = ("model", "model_name", "classes")
FOR_RESUME = FOR_INFERENCE + ("optimizer", "scaler", "rng", "epoch", "step", "best_metric")


def load_checkpoint(path: Path, require: tuple[str, ...] = FOR_INFERENCE, map_location="cpu") -> dict:
    """Load with ``weights_only=True``; a file that is not one of this project's checkpoints with the
    ``require``d entries is one clear UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # whatever torch.load meets in a file that is not a checkpoint, it is not one
        text = str(exc).strip()
        first = text.splitlines()[0][:200] if text else ""
        # a bare "101" (the KeyError of a text file) says nothing without its kind
        said = f"torch.load: {type(exc).__name__} {first}".strip() if len(first) < 20 else first
        if first.startswith("Weights only load failed"):  # never pass on torch's advice to drop weights_only
            said = "it holds objects other than tensors and plain data, which a checkpoint never does"
        raise UserError(f"checkpoint {path} is damaged or not a checkpoint of this project ({said})") from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise UserError(f"checkpoint {path} holds no model weights: not a checkpoint of this project")
    missing = [k for k in require if k not in payload]
    if missing:
        raise UserError(f"checkpoint {path} lacks {', '.join(missing)}: not a checkpoint of this project's training")
    return payload


def training_payload(*, model, optimizer, lr_schedule: dict, scaler, stage: str, epoch: int, step: int,
                     metric: float | None,
                     best_metric: float, model_name: str, classes: list[str], class_counts: list[int] | None,
                     decision_rule: dict | None, config: dict, epoch_progress: dict, dali: list[str], dali_graph: str,
                     rng_per_rank: list[dict], world_size: int, holdout: dict | None = None) -> dict:
    """The payload as the train and tune stages save it (see the module docstring)."""
    return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "lr_schedule": lr_schedule, "scaler": scaler.state_dict(), "rng": rng_per_rank[0],
            "rng_per_rank": rng_per_rank,
            "stage": stage, "epoch": epoch, "step": step, "metric": metric, "best_metric": best_metric,
            "model_name": model_name, "classes": classes, "class_counts": class_counts,
            "decision_rule": decision_rule, "config": config, "epoch_progress": epoch_progress, "dali": dali,
            "dali_graph": dali_graph,
            "world_size": world_size, "holdout": holdout}


def model_from_checkpoint(state: dict, channels_last: bool = False) -> torch.nn.Module:
    """The classifier a payload describes, with its weights."""
    model = create_model(state["model_name"], len(state["classes"]), channels_last)
    load_weights(model, state)
    return model


def load_weights(model: torch.nn.Module, state: dict) -> None:
    """The payload's weights into ``model``; a UserError when they were saved from another architecture."""
    # weights saved through a torch.compile or DDP wrapper (older versions did) carry their prefixes
    weights = {k.replace("_orig_mod.", "").removeprefix("module."): v for k, v in state["model"].items()}
    try:
        unwrap(model).load_state_dict(weights)
    except RuntimeError as exc:
        raise UserError(f"the checkpoint's weights ({state.get('model_name', 'unknown model')}, "
                        f"{len(state.get('classes', []))} classes) do not fit this model "
                        f"({str(exc).strip().splitlines()[0]}): check model.name") from None
