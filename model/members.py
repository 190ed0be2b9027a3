"""Ensemble members: several checkpoints that predict as one, how their scores combine, and the ENSEMBLE file's
one home (``python -m inference.ensemble`` is the command that makes one).

An ENSEMBLE file is a small JSON document written by ``python -m inference.ensemble``::

    {"format": "iic-ensemble/1",
     "members": [{"path": "../seed1/tune/checkpoints/best.pt", "sha256": "...", "model_name": "...",
                  "holdout_f2": 0.61}, ...],
     "combination": {"method": "mean"} | {"method": "vote", "k": 2},
     "decision_rule": {...},            # chosen on the combined scores, as the tune stage chooses one
     "holdout": {"images": 112, "sha256": "..."},   # the hold-out it was chosen on
     "holdout_f2": 0.66}

Member paths are relative to the file's folder (absolute where they share no root with it), so a folder of
artifacts can move as a whole. A member is checked against its sha256 before it is used: a model retrained
in place is not the model the rule was chosen for.

Members are combined on their rescored top-k scores (``model.metrics.topk_rescore``), the scores every
decision rule reads: ``mean`` averages them (a class outside a member's top k counts 0 there); ``vote`` with
``k`` takes each class's k-th highest score among the members, so a threshold t on it keeps exactly the labels
that at least k of the n members score above t (the 3rd place's vote).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from common.atomic import atomic_write
from common.errors import UserError
from common.shard_format import file_sha256  # the manifest's hash of a file, reused
from model.checkpoint import for_inference, load_checkpoint, model_from_checkpoint
from model.decision import ChosenRule, DecisionRule

log = logging.getLogger(__name__)

FORMAT = "iic-ensemble/1"
# what a checkpoint's model sees of its input: members must agree, as one DALI pass serves them all
INPUT_SETTINGS = (("data", "shortest_side"), ("pipeline", "crop_size"), ("pipeline", "mean"), ("pipeline", "std"))


def is_ensemble_file(path: Path) -> bool:
    """An ENSEMBLE file is JSON; a checkpoint is a zip archive (torch.save)."""
    with open(path, "rb") as f:
        return f.read(64).lstrip().startswith(b"{")


@dataclass(frozen=True)
class Combination:
    method: str = "mean"  # mean | vote
    k: int = 0  # vote: at least k of the members

    @classmethod
    def from_vote(cls, vote: int, members: int) -> "Combination":
        """``predict.ensemble_vote``: 0 is the mean; k in 1..n is a vote of at least k members (one model
        predicts alone, whatever the setting)."""
        if vote == 0 or members == 1:
            return cls()
        if vote > members:
            raise UserError(f"predict.ensemble_vote={vote} asks for at least {vote} of {members} member(s) to "
                            f"agree: set it to at most {members}, or 0 for the mean")
        return cls("vote", vote)

    def to_dict(self) -> dict:
        return {"method": "mean"} if self.method == "mean" else {"method": "vote", "k": self.k}

    @classmethod
    def from_dict(cls, d: dict) -> "Combination":
        return cls() if d["method"] == "mean" else cls("vote", int(d["k"]))

    def describe(self, members: int) -> str:
        return f"mean of {members}" if self.method == "mean" else f"vote of at least {self.k} of {members}"


def combine_topk(tops: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int, k: int,
                 combination: Combination) -> tuple[torch.Tensor, torch.Tensor]:
    """Members' (indices [B, k], rescored scores [B, k]) -> the ensemble's (indices, scores) [B, k], best first."""
    if len(tops) == 1:
        return tops[0]
    dense = torch.zeros(len(tops), tops[0][0].shape[0], num_classes, device=tops[0][1].device)
    for m, (indices, scores) in enumerate(tops):
        dense[m].scatter_(1, indices, scores.float())
    if combination.method == "mean":
        combined = dense.mean(0)
    else:  # the k-th highest of the members' scores: at least k members score that much
        combined = dense.topk(combination.k, dim=0).values[-1]
    scores, indices = combined.topk(min(k, num_classes), dim=1)
    return indices, scores


@dataclass
class Member:
    path: Path
    state: dict  # the checkpoint payload
    sha256: str

    @property
    def input_settings(self) -> dict:
        trained = self.state.get("config") or {}
        return {f"{s}.{k}": trained.get(s, {}).get(k) for s, k in INPUT_SETTINGS}


def load_members(paths: list[Path], expected_sha256: list[str] | None = None, named_by: Path | None = None
                 ) -> list[Member]:
    """The checkpoints, each checked: readable, a checkpoint, the bytes the ENSEMBLE names; and together: the
    same class list, the same input (one DALI pass feeds them all)."""
    members = []
    for i, path in enumerate(paths):
        if named_by and not Path(path).is_file():
            raise UserError(f"ensemble member {path} (named by {named_by}) not found: was it moved or deleted? "
                            "Member paths are relative to the ensemble file's folder")
        state = load_checkpoint(path)
        digest = file_sha256(path)
        want = expected_sha256[i] if expected_sha256 else None
        if want and digest != want:
            raise UserError(f"ensemble member {path} has changed since the ensemble was made (sha256 {digest[:12]}, "
                            f"the ensemble names {want[:12]}): its decision rule was chosen for the old model; "
                            "make the ensemble again with python -m inference.ensemble")
        twin = next((m for m in members if m.sha256 == digest), None)
        if twin:
            raise UserError(f"ensemble members {twin.path} and {path} are the same model (the same bytes): an "
                            "ensemble needs different members, e.g. trained with another train.seed")
        members.append(Member(Path(path), for_inference(state), digest))
    first = members[0]
    first_input = first.input_settings
    for other in members[1:]:
        if other.state["classes"] != first.state["classes"]:
            a, b = len(first.state["classes"]), len(other.state["classes"])
            detail = f"{a} and {b} classes" if a != b else f"both {a} classes, in another order or with other codes"
            raise UserError(f"ensemble members {first.path} and {other.path} were trained on different class lists "
                            f"({detail}): members must come from the same shards")
        for key, value in other.input_settings.items():
            mine = first_input[key]
            if value is not None and mine is not None and value != mine:
                raise UserError(f"ensemble members {first.path} and {other.path} were trained on different input "
                                f"({key}={mine} and {value}): one DALI pass serves every member, so members must "
                                "share data.shortest_side, pipeline.crop_size, pipeline.mean and pipeline.std")
    return members


def member_models(members: list[Member], channels_last: bool, device: torch.device) -> list[torch.nn.Module]:
    return [model_from_checkpoint(m.state, channels_last).to(device).eval() for m in members]


@dataclass
class EnsembleFile:
    """A parsed ENSEMBLE file, member paths resolved."""
    path: Path
    member_paths: list[Path]
    member_sha256: list[str]
    combination: Combination
    decision_rule: DecisionRule
    holdout: dict
    holdout_f2: float | None

    @classmethod
    def read(cls, path: Path) -> "EnsembleFile":
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
            if doc.get("format") != FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, expected {FORMAT!r}")
            members = doc["members"]
            if not members:
                raise ValueError("no members")
            # an absolute member path stays as it is: joining it to the folder keeps it whole
            return cls(path, [(path.parent / m["path"]).resolve() for m in members], [str(m["sha256"]) for m in members],
                       Combination.from_dict(doc["combination"]), DecisionRule.from_dict(doc["decision_rule"]),
                       dict(doc["holdout"]), doc.get("holdout_f2"))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path} is not an ensemble file made by python -m inference.ensemble ({exc})") from None


def relative_to(path: Path, folder: Path) -> str:
    """``path`` as the ENSEMBLE file in ``folder`` names it: relative where they share a root."""
    try:
        return os.path.relpath(Path(path).resolve(), folder.resolve())
    except ValueError:  # another drive (Windows)
        return str(Path(path).resolve())


def write_ensemble_file(out: Path, members: list[Member], combination: Combination, chosen: ChosenRule,
                        holdout: dict, member_chosen: list[ChosenRule]) -> None:
    """``holdout_f2``: the F2 of each rule on the hold-out images that chose it; ``holdout_f2_cross_fitted``: the
    same choice cross-fitted over folds of them, what new images can expect (``model.decision``)."""
    def figures(c: ChosenRule) -> dict:
        return {"holdout_f2": round(c.f2_in_sample, 5), "holdout_f2_cross_fitted": round(c.f2_cross_fitted, 5)}
    doc = {"format": FORMAT,
           "members": [{"path": relative_to(m.path, out.parent), "sha256": m.sha256,
                        "model_name": m.state["model_name"], **figures(c)} for m, c in zip(members, member_chosen)],
           "combination": combination.to_dict(), "decision_rule": chosen.rule.to_dict(), "holdout": holdout,
           **figures(chosen)}
    with atomic_write(out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def check_holdout(members: list[Member], holdout: dict, what: str) -> None:
    """A tuned member was fitted on the tune images outside its hold-out: a rule chosen on another hold-out
    would be chosen on images some member trained on. Members that record no hold-out (train stage) fit none.
    ``what`` names ``holdout``, e.g. "this config's tune hold-out"."""
    def named(h: dict) -> str:
        return f"{h.get('images')} images, sha256 {str(h.get('sha256'))[:12]}"
    for m in members:
        theirs = m.state.get("holdout")
        if theirs and theirs.get("sha256") != holdout.get("sha256"):
            raise UserError(f"{what} ({named(holdout)}) is not the hold-out {m.path} was tuned with "
                            f"({named(theirs)}): a rule chosen on it would be chosen on images that member "
                            "trained on; use the config the members were tuned with (data.seed, "
                            "tune.holdout_fraction, paths.shards)")


@dataclass
class Predictor:
    """What predicts a submission: one model or several, how their scores combine, and the decision rule."""
    members: list[Member]
    combination: Combination
    rule: DecisionRule
    rule_source: str  # where the rule comes from, for the log

    @property
    def state(self) -> dict:
        """The first member's payload: classes and class counts (the same for every member)."""
        return self.members[0].state


def resolve_checkpoints(paths: list[Path], cfg) -> Predictor:
    """``--checkpoint`` as given: one checkpoint (its tuned rule, else the config's), one ENSEMBLE file (its
    members, combination and rule), or several checkpoints (an unscored mix: ``predict.ensemble_vote`` and the
    config's rule)."""
    ensembles = [p for p in paths if is_ensemble_file(p)]
    if ensembles:
        if len(paths) > 1:
            raise UserError(f"{ensembles[0]} is an ensemble file: pass it as the only --checkpoint")
        ens = EnsembleFile.read(paths[0])
        vote = cfg.predict.ensemble_vote
        if vote and Combination("vote", vote) != ens.combination:
            log.warning("predict.ensemble_vote=%d does not apply: %s combines its members as its rule was chosen "
                        "for (%s); make another ensemble for another combination", vote,
                        paths[0], ens.combination.describe(len(ens.member_paths)))
        members = load_members(ens.member_paths, ens.member_sha256, named_by=paths[0])
        check_holdout(members, ens.holdout, f"the hold-out {paths[0]} chose its rule on")
        return Predictor(members, ens.combination, ens.decision_rule, f"{paths[0]} ({ens.combination.describe(len(members))})")
    members = load_members(paths)
    combination = Combination.from_vote(cfg.predict.ensemble_vote, len(members))
    if len(members) == 1 and members[0].state.get("decision_rule"):
        return Predictor(members, combination, DecisionRule.from_dict(members[0].state["decision_rule"]),
                         f"{paths[0]} (tuned)")
    source = "the config (submit.threshold, submit.min_labels, predict.max_labels)"
    if len(members) > 1:
        source += (f"; {combination.describe(len(members))} unscored: python -m inference.ensemble chooses a rule "
                   "for them on the tune hold-out")
    return Predictor(members, combination, DecisionRule.from_config(cfg), source)
