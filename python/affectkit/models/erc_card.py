"""The model card of `erc-meld` (README.md beside its model.safetensors)."""

from __future__ import annotations

from pathlib import Path

from ..text.cache import atomic_write_bytes
from ..text.lexicon import NUM_FEATURES


def _extras(names) -> str:
    words = {"lexicon": f"{NUM_FEATURES} NRC EmoLex and surface features",
             "text-emotion": "the 28 logits of the shipped `text-emotion` model (GoEmotions)"}
    return " and ".join(words[n] for n in names) or "nothing else"


def render_erc_card(config: dict, metrics: dict) -> str:
    hp = metrics.get("hyper", {})
    per_class = ", ".join(f"{k} {v:.2f}" for k, v in metrics["per_class_f1"].items())
    lines = [
        "# affectkit `erc-meld`",
        "",
        "Emotion recognition in conversation: the emotion of each utterance of a dialogue, read in the context "
        "of the dialogue, over MELD's 7 classes (neutral, joy, surprise, anger, sadness, disgust, fear). Text only.",
        "",
        "## Data and license",
        f"MELD (Poria et al., ACL 2019), **GPL-3.0**: the official train split ({metrics['train_utterances']:,} "
        f"utterances in {metrics['train_dialogues']:,} dialogues of the TV series Friends) for training; the dev "
        f"split ({metrics['dev_utterances']:,} utterances, {metrics['dev_dialogues']} dialogues) chooses the epoch and "
        "fits the temperature. The test split was never read. These weights are derived from MELD; check that the "
        "GPL-3.0 terms suit your use.",
        "",
        "## Model (`affectkit.models.M2FNet`, text only)",
        f"- Utterances: `{config['encoder']}`; its bottom layers frozen, its top {config['tuned_layers']} layers "
        + (f"started from those of `{hp['encoder_init']}` (fine-tuned on its corpus first) and " if hp.get("encoder_init")
           else "")
        + "fine-tuned on MELD (running on affectkit's fused attention with each utterance's real token count), "
        "mean-pooled, joined with " + _extras(config.get("extra_features", ["lexicon"])) + ".",
        f"- Dialogue: speaker embeddings (speakers numbered by first appearance, so any names work), sinusoidal "
        f"utterance positions, {config['num_layers']} transformer encoder layers (width {config['d_model']}, "
        f"{config['num_heads']} heads) whose attention runs on the fused kernel with each dialogue's length (no "
        "padding reaches the attention), then an MLP over [context, fused] features.",
        f"- Loss: cross-entropy with class weights (n / count) ** {hp.get('class_weight_power')} (MELD is 47 % "
        f"neutral); AdamW, one-cycle schedule, {hp.get('epochs')} epochs, batches of {hp.get('batch_dialogues')} "
        f"dialogues; encoder lr {hp.get('encoder_lr')}, rest {hp.get('lr')}.",
        f"- Calibration: softmax temperature T = {metrics['temperature']:.3f} fitted on dev.",
        "",
        "## Dev scores (MELD dev; chosen on it, so slightly optimistic)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| weighted F1 (7 emotions) | {metrics['weighted_f1']:.4f} |",
        f"| macro F1 | {metrics['macro_f1']:.4f} |",
        f"| accuracy | {metrics['accuracy']:.4f} |",
        f"| ECE, top label | {metrics['ece_top_label']:.4f} |",
        f"| best epoch | {metrics['best_epoch']} of {len(metrics['dev_weighted_f1_per_epoch'])} |",
        "",
        f"Per-class dev F1: {per_class}. Dev weighted F1 per epoch: {metrics['dev_weighted_f1_per_epoch']}.",
        "",
        "## Test scores",
        "Not measured here: MELD's test split is not in the training environment (on purpose). Run "
        "`affectkit evaluate erc-meld --data test_sent_emo.csv` on it.",
        *_test_mix_lines(metrics),
        "",
        "## Training time",
        f"Frozen encoder pass {metrics['encode_seconds']:.0f} s, training {metrics['train_seconds']:.0f} s "
        f"({metrics['machine']}; a 2-core machine, at times shared with other jobs).",
        "",
        "## Limits",
        "English, scripted sitcom dialogue; weaker on other genres. Rare classes (fear, disgust) are hard: see their "
        "F1 above. Audio and video are not used by this model (M2FNet takes them when you train with them).",
    ]
    return "\n".join(lines) + "\n"


def _test_mix_lines(metrics: dict) -> list[str]:
    if "dev_weighted_f1_at_test_class_mix" not in metrics:
        return []
    lo, hi = metrics["dev_weighted_f1_at_test_class_mix_5_95"]
    return ["", f"An estimate, not a measurement: the dev predictions scored at the test split's published class "
            f"mix (48 % neutral against 42 % on dev; each dev utterance weighted by its class's test share over its "
            f"dev share) give weighted F1 {metrics['dev_weighted_f1_at_test_class_mix']:.4f} (5-95 % over dev "
            f"dialogues resampled: {lo:.3f}-{hi:.3f}). The epoch was chosen on dev, so this too leans optimistic."]


def write_erc_card(out_dir, config: dict, metrics: dict) -> Path:
    path = Path(out_dir) / "README.md"
    text = render_erc_card(config, metrics)
    atomic_write_bytes(path, lambda f: f.write(text.encode()))
    return path
