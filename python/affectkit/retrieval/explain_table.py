"""The human-readable `affectkit analyze --explain` table."""

from __future__ import annotations

from rich.table import Table


def explain_table(result: dict, *, dialogue: bool = False) -> Table:
    """One block of rows per utterance: its top emotion, then the nearest training examples."""
    table = Table(title="nearest training examples of the same emotion (GoEmotions train)")
    for col in ("#", "utterance", "emotion", "similarity", "training example", "its labels"):
        table.add_column(col, overflow="fold")
    for i, row in enumerate(result["utterances"], start=1):
        found = row.get("nearest_examples")
        if found is None:
            continue
        said = f"{row['speaker']}: {row['text']}" if dialogue and row.get("speaker") else row["text"]
        examples = found["examples"] or [None]
        for j, ex in enumerate(examples):
            head = [str(i), said, found["emotion"]] if j == 0 else ["", "", ""]
            if ex is None:
                table.add_row(*head, "-", "(no training example carries this emotion)", "")
            else:
                table.add_row(*head, f"{ex['similarity']:.2f}", ex["text"], ", ".join(ex.get("labels", [])))
        table.add_section()
    return table
