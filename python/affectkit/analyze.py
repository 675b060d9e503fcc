"""The main job: emotions (with calibrated probabilities) and valence/arousal/dominance of
each utterance, plus, when the input is a dialogue, each utterance's emotion read in the context
of its dialogue (the `erc-meld` conversation model) and a per-speaker summary."""

from __future__ import annotations

import numpy as np

from .textio import Document, Utterance


def analyze(doc: Document | list[str], *, emotion="text-emotion", vad="vad", erc="erc-meld", top: int = 3,
            progress: bool = False, explain: int = 0, data=None, source: str = "input") -> dict:
    """`emotion`/`vad`/`erc` are model names, folders, or loaded models (`vad`/`erc` may be
    None to skip them; `erc` is used only for dialogues). Returns a JSON-ready dict.

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
    in_context, notes = None, []
    if doc.is_dialogue and erc is not None:
        doc.check_speakers(source)  # before any model runs: no partial output
        in_context = _in_context(doc, load(erc) if isinstance(erc, str) else erc)
        notes = _lone_utterance_notes(doc)
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
        if in_context is not None:
            row["in_context"] = in_context[i]
        if examples is not None:
            row["nearest_examples"] = {"emotion": chosen[i][0], "examples": examples[i]}
        rows.append(row)
    result = {"kind": doc.kind, "utterances": rows}
    if notes:
        result["notes"] = notes
    if doc.is_dialogue:
        result["speakers"] = _speaker_summary(doc, probs, dims, emo.labels)
    return result


def _in_context(doc: Document, model) -> list[dict]:
    """Per utterance: the conversation model's emotion and its probability, dialogue by dialogue."""
    groups = doc.dialogues()
    dialogues = [[(doc.utterances[i].speaker, doc.utterances[i].text) for i in g] for g in groups]
    out: list[dict] = [{}] * len(doc.utterances)
    for idx, probs in zip(groups, model.predict_dialogues_proba(dialogues)):
        for i, p in zip(idx, probs):
            j = int(np.argmax(p))
            out[i] = {"emotion": model.labels[j], "probability": round(float(p[j]), 4),
                      "dialogue": doc.utterances[i].dialogue}
    return out


def _lone_utterance_notes(doc: Document) -> list[str]:
    """A dialogue of one utterance has no context: say so rather than let its in-context
    emotion pass for a reading of a conversation."""
    notes = []
    for group in doc.dialogues():
        if len(group) == 1:
            u = doc.utterances[group[0]]
            name = f"dialogue {u.dialogue!r}" if u.dialogue is not None else "the dialogue"
            notes.append(f"{name} has one utterance (utterance {group[0] + 1}), so its in-context emotion is read "
                         "without any context")
    return notes


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
