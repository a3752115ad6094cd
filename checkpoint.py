"""What a training run keeps on disk, so that a crash loses nothing and `--resume` continues exactly:
`checkpoint.pt` (the trainable weights, Adam's state, the iteration, the flags, the score of best/) and
`best/`, a plain Hugging Face folder. Under FSDP every rank calls these functions (the gathers are
collectives); rank 0 (`master`) writes. A reader of the paper can skip this file.
"""
import dataclasses
import os
import shutil
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

import model as M


def trainable(model) -> set[str]:
    """Names of the weights training changes (the LoRA adapters, or every weight): what a checkpoint holds."""
    return {n for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: Path, model, optimizer, args, iteration: int, master: bool, best=None) -> None:
    """Trainable weights + optimizer state + iteration + args (a dataclass) + the score of best/, written
    atomically: a crash mid-write never leaves a broken checkpoint behind."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    names = trainable(model)
    model_sd = {k: v for k, v in model_sd.items() if k in names}  # a tied (frozen) LM head slips through
    if master:
        tmp = path.with_suffix(".tmp")
        torch.save(dict(model=model_sd, optimizer=optim_sd, iteration=iteration, args=dataclasses.asdict(args),
                        best=best), tmp)
        os.replace(tmp, path)


def load_checkpoint(path: Path, model, optimizer) -> tuple[int, tuple | None]:
    """Restore trainable weights and optimizer state on every rank; returns the next iteration and
    the score of best/ (None before any evaluation). The optimizer's hyperparameters come from this
    run's flags, not the checkpoint: `--resume --lr 0` must mean lr 0."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    saved, names = set(ckpt["model"]), trainable(model)
    if saved != names:  # e.g. another --lora-rank: the model would silently start afresh
        raise ValueError(f"{path} does not hold this model's trainable weights: missing "
                         f"{sorted(names - saved)[:5]}, unexpected {sorted(saved - names)[:5]}")
    flags = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]  # lr, eps, ...
    set_state_dict(model, optimizer, model_state_dict=ckpt["model"], optim_state_dict=ckpt["optimizer"],
                   options=StateDictOptions(full_state_dict=True, strict=False))
    for group, f in zip(optimizer.param_groups, flags):
        group.update(f)
    return ckpt["iteration"], ckpt.get("best")


def save_best(model, tokenizer, out: Path, master: bool) -> None:
    """Replace out/best (a from_pretrained folder) by the model, written beside it first, so a
    complete best/ exists at every moment but between two renames."""
    best, tmp, old = out / "best", out / "best.tmp", out / "best.old"
    if master:
        shutil.rmtree(tmp, ignore_errors=True)  # what a crash mid-write left
    M.save(model, tokenizer, tmp)
    if master:
        if best.exists():
            os.replace(best, old)
        os.replace(tmp, best)
        shutil.rmtree(old, ignore_errors=True)
