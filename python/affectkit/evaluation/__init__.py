"""Evaluation protocols that never leak windows of one trial across train and test."""

from .splits import Split, finetune_protocol, kfold_by_trial, leave_one_subject_out

__all__ = ["Split", "finetune_protocol", "kfold_by_trial", "leave_one_subject_out"]
