"""Reading utterances for `affectkit analyze --file`: plain lines, CSV, JSON lines, and
`speaker: utterance` transcripts (read as one dialogue)."""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

# "Name: words" where the name is short and has no sentence punctuation.
_SPEAKER = re.compile(r"^\s*([^\s:][^:!?]{0,39}?)\s*:\s+(\S.*)$")


@dataclass
class Utterance:
    text: str
    speaker: str | None = None
    dialogue: str | None = None  # from a dialogue column; a transcript is one dialogue


@dataclass
class Document:
    utterances: list[Utterance]
    kind: str  # "lines", "dialogue", "csv", "jsonl"

    @property
    def is_dialogue(self) -> bool:
        return any(u.speaker for u in self.utterances)

    def dialogues(self) -> list[list[int]]:
        """Utterance indices grouped by dialogue id (first-appearance order), in file order."""
        groups: dict[str | None, list[int]] = {}
        for i, u in enumerate(self.utterances):
            groups.setdefault(u.dialogue, []).append(i)
        return list(groups.values())

    def check_speakers(self, source: str) -> None:
        """A dialogue needs a speaker on every utterance; name the first one without."""
        for i, u in enumerate(self.utterances):
            if not u.speaker:
                raise ValueError(f"{source}: utterance {i + 1} ({u.text[:40]!r}) has no speaker; a dialogue "
                                 "needs one on every utterance")


def read_text_file(path) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file {str(path)!r} does not exist")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); convert it to UTF-8 first") from err


def _check_text(text, where: str) -> str:
    if not isinstance(text, str):
        raise ValueError(f"{where}: expected text, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{where}: the text is empty")
    return text


def parse_lines(content: str, source: str = "<text>") -> Document:
    lines = [(i + 1, line) for i, line in enumerate(content.splitlines()) if line.strip()]
    if not lines:
        raise ValueError(f"{source}: no text in it")
    matches = [_SPEAKER.match(line) for _, line in lines]
    if all(matches):
        return Document([Utterance(m.group(2).strip(), m.group(1).strip()) for m in matches], "dialogue")
    speaking = sum(m is not None for m in matches)
    if speaking >= 2 and speaking * 2 > len(lines):
        # Mostly "speaker: utterance": a transcript with a broken line, not plain text.
        line_no, line = next((n, line) for (n, line), m in zip(lines, matches) if m is None)
        raise ValueError(f"{source} line {line_no}: expected 'speaker: utterance' like the other lines of this "
                         f"transcript, got {line.strip()[:60]!r}")
    return Document([Utterance(line.strip()) for _, line in lines], "lines")


def _column(fields, name: str) -> str | None:
    """The field called `name`, matched case-insensitively (MELD writes Speaker, Dialogue_ID)."""
    exact = [f for f in fields if f == name]
    folded = [f for f in fields if f.lower() == name.lower()]
    return (exact or folded or [None])[0]


def _dialogue_column(fields) -> str | None:
    return _column(fields, "dialogue") or _column(fields, "dialogue_id")


def parse_csv(content: str, source: str, column: str = "text", speaker_column: str = "speaker") -> Document:
    reader = csv.DictReader(io.StringIO(content))
    fields = reader.fieldnames or []
    if column not in fields:
        raise ValueError(f"{source}: expected a column named {column!r} (choose another with --column); found {fields}")
    speaker_field, dialogue_field = _column(fields, speaker_column), _dialogue_column(fields)
    utts = []
    for row_no, row in enumerate(reader, start=2):
        text = _check_text(row.get(column) or "", f"{source} line {row_no}, column {column!r}")
        speaker = ((row.get(speaker_field) or "").strip() or None) if speaker_field else None
        dialogue = ((row.get(dialogue_field) or "").strip() or None) if dialogue_field else None
        utts.append(Utterance(text, speaker, dialogue))
    if not utts:
        raise ValueError(f"{source}: the CSV has a header but no rows")
    return Document(utts, "csv")


def parse_jsonl(content: str, source: str, column: str = "text", speaker_column: str = "speaker") -> Document:
    utts = []
    for line_no, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source} line {line_no}: not valid JSON ({err.msg})") from err
        if isinstance(obj, str):
            obj = {column: obj}
        if not isinstance(obj, dict) or column not in obj:
            raise ValueError(f"{source} line {line_no}: expected an object with a {column!r} field")
        text = _check_text(obj[column], f"{source} line {line_no}, field {column!r}")
        speaker = obj.get(_column(obj, speaker_column) or speaker_column)
        dialogue = obj.get(_dialogue_column(obj) or "dialogue")
        utts.append(Utterance(text, str(speaker) if speaker else None, str(dialogue) if dialogue is not None else None))
    if not utts:
        raise ValueError(f"{source}: no JSON lines in it")
    return Document(utts, "jsonl")


def read_document(path, column: str = "text") -> Document:
    """By extension: .csv -> CSV, .jsonl/.json/.ndjson -> JSON lines, anything else -> lines."""
    content = read_text_file(path)
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return parse_csv(content, str(path), column)
    if suffix in (".jsonl", ".json", ".ndjson"):
        return parse_jsonl(content, str(path), column)
    return parse_lines(content, str(path))
