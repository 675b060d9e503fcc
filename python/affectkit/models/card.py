"""Model cards (README.md beside model.safetensors), written from the config and dev metrics."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from ..text.cache import atomic_write_bytes
from ..text.lexicon import NUM_FEATURES

DATA = {
    "text-emotion": "GoEmotions (Demszky et al., ACL 2020; Apache-2.0): 43,410 Reddit comments of the "
                    "official train split, 27 emotions + neutral, multi-label. Dev (5,426) chooses the "
                    "epoch, the temperature and the per-label thresholds.",
    "vad": "EmoBank (Buechel & Hahn, EACL 2017; CC BY-SA 4.0): 8,062 train sentences rated for valence, "
           "arousal and dominance on 1..5; the 1,000 dev sentences choose the epoch.",
    "empathy": "Empathic reactions to news (Buechel et al., EMNLP 2018; CC BY 4.0): the 1,485 released "
               "training essays (297 writers) with empathic concern and personal distress on 1..7. There is no "
               "dev split, and a held-out 20% scores a model only to about +-0.05 in Pearson r, so the recipe is "
               "scored by 10-fold cross-validation over every essay: with each writer's essays in one fold (the "
               "estimate for unseen writers) and with random folds (the protocol of Buechel et al., 2018). A "
               "twin fitted on 80% of the essays is also scored on the fixed other 20% (SHA-256 of message_id "
               "< 0.2). The shipped model is fitted on all 1,485 essays.",
}


def _fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def render_card(config: dict, metrics: dict) -> str:
    kind = config["kind"]
    lines = [
        f"# affectkit `{kind}`",
        "",
        "## Data",
        DATA.get(kind, "see metrics.json"),
        "",
        "## Recipe",
        *_recipe_lines(config, metrics),
    ]
    if config.get("ngram_features"):
        lines.append(
            f"- Plus a linear layer over {config['ngram_features']:,} hashed word uni+bigram indicators (scikit-learn's "
            "HashingVectorizer: stateless, so no vocabulary or corpus text is stored), trained jointly with the MLP; "
            "its table is stored in float16."
        )
    if kind == "text-emotion":
        lines += [
            f"- Calibration: temperature scaling fitted on dev (T = {metrics['temperature']:.3f}); "
            "per-label thresholds maximising each label's F1 on dev; every text gets at least its top label.",
            "- Ekman grouping: GoEmotions' own mapping (`affectkit.data.goemotions.EKMAN`).",
        ]
    heading = "Cross-validated and held-out scores" if kind == "empathy" else "Dev scores"
    lines += ["", f"## {heading}", "", "| metric | value |", "|---|---|"]
    skip = {"per_label_f1", "cross_fitted", "best_epoch", "epochs_run", "head_training_seconds",
            "total_seconds_including_encoding", "texts_encoded_this_run", "hyper", "finetune_seconds",
            "frozen_layers_seconds", "ridge_alphas"}
    for key, value in metrics.items():
        if key not in skip:
            lines.append(f"| {key} | {_fmt(value)} |")
    if kind == "text-emotion":
        lines += [
            "",
            f"Thresholds and temperature are fitted on dev, so dev macro-F1 is optimistic. Choosing the "
            f"thresholds on one half of dev and scoring the other (2-fold) gives macro-F1 "
            f"**{metrics['cross_fitted']['macro_f1']:.3f}**, the better estimate of the unseen test split. "
            f"ECE before temperature scaling: {metrics['ece_before_temperature']:.4f}; after: {metrics['ece']:.4f}.",
            "",
            "Per-label dev F1: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics["per_label_f1"].items()) + ".",
        ]
    lines += [
        "",
        "## Test scores",
        "Not measured here: the official test split is not in the training environment (on purpose). "
        "Run `affectkit evaluate " + kind + " --data <test file>` on it.",
        "",
        "## Training time",
        _training_time(config, metrics),
        "",
        "## Limits",
        "English only; trained on Reddit comments / news-reaction essays / mixed-genre sentences and weaker outside "
        "them. The encoder reads the first 256 word pieces; inputs over 5,000 characters are truncated with a warning.",
    ]
    return "\n".join(lines) + "\n"


def _recipe_lines(config: dict, metrics: dict) -> list[str]:
    head = (f"one hidden layer of {config['hidden']} GELU units" if config["hidden"] else "linear")
    lexicon = (f"followed by {NUM_FEATURES} NRC EmoLex lexicon and surface features (the `nrclex` package); "
               f"{config['in_dim']} inputs")
    k = config.get("tuned_layers", 0)
    if config.get("features") == "emotion-augmented":
        return [
            f"- Features ({config['in_dim']}): `{config['encoder']}` sentence embedding (frozen, mean-pooled, "
            f"L2-normalised) and {NUM_FEATURES} NRC EmoLex lexicon and surface features (the `nrclex` package); the "
            f"`{config['emotion_model']}` model's fine-tuned encoder embedding of the whole essay; and the mean of that "
            "encoder's embeddings of each sentence (which covers essays longer than the encoder's 256 word pieces). "
            f"The emotion model's weights are pinned by SHA-256 ({config['emotion_model_sha256'][:12]}...).",
            "- Head: linear, ridge regression on the standardised features (scikit-learn `RidgeCV`), the penalty "
            f"chosen per target by leave-one-out on the training rows (alphas {', '.join(f'{a:.3g}' for a in metrics.get('ridge_alphas', []))}).",
        ] + _char_ngram_lines(config)
    if not k:
        return [
            f"- Features: `{config['encoder']}` sentence embedding (frozen, mean-pooled, L2-normalised) {lexicon}, "
            "standardised with the train split's mean and std.",
            f"- Head: {head}, dropout, AdamW; the epoch with the lowest dev loss is kept "
            f"(epoch {metrics.get('best_epoch')} of {metrics.get('epochs_run')} run).",
        ]
    hp = metrics.get("hyper", {})
    return [
        f"- Encoder: `{config['encoder']}` with its top {k} layers fine-tuned jointly with the head (their weights "
        "are in this file, in float16; the frozen bottom layers come from the encoder's own package). The tuned "
        "layers run on affectkit's fused attention over each text's real tokens.",
        f"- Features: the mean-pooled, L2-normalised embedding {lexicon}, standardised with the untuned "
        "embedding's train statistics.",
        f"- Head: {head}, dropout {hp.get('dropout')}. AdamW with a one-cycle schedule: encoder learning rate "
        f"{hp.get('encoder_lr')}, head {hp.get('lr')}, batches of {hp.get('batch')} texts, {hp.get('epochs')} "
        f"epochs; the epoch with the best cross-fitted dev macro-F1 is kept (epoch {metrics.get('best_epoch')}; "
        f"per epoch: {metrics.get('dev_score_per_epoch')}).",
    ]


def _char_ngram_lines(config: dict) -> list[str]:
    c = config.get("char_ngrams")
    if not c:
        return []
    return [f"- Blended with weight {c['weight']}: a second ridge (penalty {c['alpha']}) over sublinear TF-IDF of "
            f"character 2..5-grams within words, hashed into {c['n_features']:,} buckets (scikit-learn's "
            "HashingVectorizer: no vocabulary or corpus text is stored). It reads wording the embeddings smooth "
            "away; the `*_only_*` rows below score each view alone (folds of writers)."]


def _training_time(config: dict, metrics: dict) -> str:
    machine = f"2 CPU cores ({platform.machine()}, torch {torch.__version__})"
    if config.get("features") == "emotion-augmented":
        return (f"Whole run {metrics.get('total_seconds_including_encoding', 0):.0f} s on {machine}, shared with other "
                f"jobs: the emotion encoder over every essay and every sentence (not cached), the frozen embedding "
                f"({metrics.get('texts_encoded_this_run', 0)} texts encoded in that run, the rest from the embedding "
                f"cache), and {metrics.get('head_training_seconds', 0):.0f} s for the 22 ridge fits of the "
                "cross-validation, the held-out twin and the shipped model.")
    if config.get("tuned_layers", 0):
        return (f"{metrics.get('total_seconds_including_encoding', 0) / 60:.0f} min for the whole run on {machine}: "
                f"the frozen layers over every text once ({metrics.get('frozen_layers_seconds', 0):.0f} s), "
                f"fine-tuning {metrics.get('finetune_seconds', 0) / 60:.0f} min, then calibration.")
    return (f"Head training {metrics.get('head_training_seconds', 0):.0f} s; whole run "
            f"{metrics.get('total_seconds_including_encoding', 0):.0f} s with "
            f"{metrics.get('texts_encoded_this_run', 0)} texts encoded in that run (the rest came from the embedding "
            f"cache) on {machine}, shared with other jobs. Encoding from scratch on the same machine ran at about "
            "19 texts/s for GoEmotions comments and 7-10 essays/s for the empathy essays (GoEmotions train + dev: "
            "about 45 minutes, once; the cache keeps the vectors for every later run).")


def write_card(out_dir, config: dict, metrics: dict) -> Path:
    path = Path(out_dir) / "README.md"
    text = render_card(config, metrics)
    atomic_write_bytes(path, lambda f: f.write(text.encode()))
    return path
