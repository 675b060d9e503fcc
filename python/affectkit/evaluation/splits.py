"""Subject-aware splits over windows (anything with `subject`, `trial` and `start` arrays).

- `kfold_by_trial`: within-subject k-fold where a fold holds whole trials.
- `leave_one_subject_out`: train on every other subject, test on one.
- `finetune_protocol`: HiSTN's subject-independent protocol: train on the other subjects,
  fine-tune on the first seconds of each trial of the held-out subject, test on the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Split:
    name: str  # e.g. "subject 3 fold 2"
    subject: str | None
    train: np.ndarray  # window indices
    test: np.ndarray
    finetune: np.ndarray | None = None


def _subjects(windows) -> list[str]:
    return sorted(set(windows.subject.tolist()), key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))


def kfold_by_trial(windows, k: int = 5, seed: int = 0) -> list[Split]:
    """Per subject, its trials shuffled into k folds; each fold is tested once."""
    if k < 2:
        raise ValueError(f"k: expected at least 2 folds, got {k}")
    rng = np.random.default_rng(seed)
    splits = []
    for subject in _subjects(windows):
        mine = np.flatnonzero(windows.subject == subject)
        trials = np.unique(windows.trial[mine])
        if len(trials) < k:
            raise ValueError(f"k: subject {subject} has {len(trials)} trials, fewer than {k} folds")
        folds = np.array_split(rng.permutation(trials), k)
        for f, held in enumerate(folds):
            is_test = np.isin(windows.trial[mine], held)
            splits.append(Split(f"subject {subject} fold {f + 1}", subject, mine[~is_test], mine[is_test]))
    return splits


def leave_one_subject_out(windows) -> list[Split]:
    subjects = _subjects(windows)
    if len(subjects) < 2:
        raise ValueError(f"windows: leave-one-subject-out needs at least 2 subjects, got {len(subjects)}")
    return [
        Split(f"subject {s} held out", s, np.flatnonzero(windows.subject != s), np.flatnonzero(windows.subject == s))
        for s in subjects
    ]


def finetune_protocol(windows, finetune_seconds: float = 10.0) -> list[Split]:
    """Windows starting before `finetune_seconds` (of each held-out trial) fine-tune; the rest test."""
    splits = []
    for base in leave_one_subject_out(windows):
        early = windows.start[base.test] < finetune_seconds
        if early.all() or not early.any():
            raise ValueError(f"finetune_seconds: {finetune_seconds} s leaves no fine-tuning or no test windows "
                             f"for subject {base.subject}")
        splits.append(Split(base.name, base.subject, base.train, base.test[~early], base.test[early]))
    return splits
