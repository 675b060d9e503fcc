"""The main job: emotions (with calibrated probabilities) and valence/arousal/dominance of
each utterance, plus a per-speaker summary when the input is a dialogue."""

from __future__ import annotations

import numpy as np

from .textio import Document, Utterance


def analyze(doc: Document | list[str], *, emotion="text-emotion", vad="vad", top: int = 3, progress: bool = False,
            explain: int = 0, data=None) -> dict:
    """`emotion`/`vad` are model names, folders, or loaded models. Returns a JSON-ready dict.

    explain > 0 adds, per utterance, that many nearest GoEmotions training examples sharing its
    top predicted emotion (`nearest_examples`); they are read from `data` or $AFFECTKIT_DATA."""
    from .models import load

    if isinstance(doc, list):
        doc = Document([Utterance(t) for t in doc], "lines")
    if top < 1:
        raise ValueError(f"top: expected a positive number of emotions, got {top}")
    if isinstance(explain, bool) or not isinstance(explain, int) or explain < 0:
        raise ValueError(f"explain: expected a number of examples >= 0, got {explain!r}")
    emo = load(emotion) if isinstance(emotion, str) else emotion
    texts = [u.text for u in doc.utterances]
    probs = emo.predict_proba(texts, progress=progress)
    chosen = emo.decide(probs)
    ekman = emo.ekman_proba(probs)
    examples = None
    if explain:
        examples = emo.nearest_examples(texts, explain, emotions=[c[0] for c in chosen], data=data, progress=progress)
    dims = None
    if vad is not None:
        vad_model = load(vad) if isinstance(vad, str) else vad
        dims = vad_model.predict(texts, progress=progress)
    rows = []
    for i, u in enumerate(doc.utterances):
        order = np.argsort(-probs[i])[:top]
        row = {
            "speaker": u.speaker,
            "text": u.text,
            "emotions": chosen[i],
            "top": [{"label": emo.labels[j], "probability": round(float(probs[i, j]), 4)} for j in order],
            "ekman": emo.ekman_labels[int(np.argmax(ekman[i]))],
        }
        if dims is not None:
            row["vad"] = {"valence": round(float(dims[i, 0]), 3), "arousal": round(float(dims[i, 1]), 3),
                          "dominance": round(float(dims[i, 2]), 3)}
        if examples is not None:
            row["nearest_examples"] = {"emotion": chosen[i][0], "examples": examples[i]}
        rows.append(row)
    result = {"kind": doc.kind, "utterances": rows}
    if doc.is_dialogue:
        result["speakers"] = _speaker_summary(doc, probs, dims, emo.labels)
    return result


def _speaker_summary(doc: Document, probs, dims, labels) -> list[dict]:
    out = []
    speakers = list(dict.fromkeys(u.speaker or "?" for u in doc.utterances))
    for s in speakers:
        idx = [i for i, u in enumerate(doc.utterances) if (u.speaker or "?") == s]
        mean = probs[idx].mean(axis=0)
        entry = {"speaker": s, "utterances": len(idx),
                 "main_emotion": labels[int(np.argmax(mean))], "mean_probability": round(float(mean.max()), 4)}
        if dims is not None:
            v, a, d = dims[idx].mean(axis=0)
            entry["mean_vad"] = {"valence": round(float(v), 3), "arousal": round(float(a), 3), "dominance": round(float(d), 3)}
        out.append(entry)
    return out
