"""Reading utterances for `affectkit analyze --file` (no model needed)."""

import pytest

from affectkit.textio import parse_csv, parse_jsonl, parse_lines, read_document


def test_speaker_lines_make_a_dialogue():
    doc = parse_lines("Dr. Lee: How are you?\n\nPat:  Fine, thanks: really.\n")
    assert doc.kind == "dialogue" and doc.is_dialogue
    assert [(u.speaker, u.text) for u in doc.utterances] == [("Dr. Lee", "How are you?"), ("Pat", "Fine, thanks: really.")]


def test_mixed_lines_stay_plain():
    doc = parse_lines("Ann: hello\njust a line without a speaker\n")
    assert doc.kind == "lines" and not doc.is_dialogue
    assert [u.text for u in doc.utterances] == ["Ann: hello", "just a line without a speaker"]
    assert parse_lines("see https://example.org now").kind == "lines"


def test_transcript_with_a_line_without_speaker_is_an_error():
    with pytest.raises(ValueError, match="line 3: expected 'speaker: utterance'"):
        parse_lines("Ann: hello\nBob: hi there\nand then nothing\nAnn: bye\n", "t.txt")


def test_dialogue_column_groups_utterances():
    doc = parse_csv("Speaker,Utterance,Dialogue_ID\nA,hi,7\nB,yo,7\nA,new talk,8\nC,sure,7\n", "x.csv", column="Utterance")
    assert doc.dialogues() == [[0, 1, 3], [2]]
    assert [u.speaker for u in doc.utterances] == ["A", "B", "A", "C"]
    with pytest.raises(ValueError, match="utterance 2 .* has no speaker"):
        parse_csv("speaker,text\nA,hi\n,yo\n", "x.csv").check_speakers("x.csv")


def test_csv_and_jsonl():
    doc = parse_csv('speaker,text\nA,"hi, there"\n,yo\n', "x.csv")
    assert [(u.speaker, u.text) for u in doc.utterances] == [("A", "hi, there"), (None, "yo")]
    doc = parse_jsonl('{"text": "a", "speaker": "S"}\n\n"b"\n', "x.jsonl")
    assert [(u.speaker, u.text) for u in doc.utterances] == [("S", "a"), (None, "b")]
    assert parse_csv("body\nhello\n", "x.csv", column="body").utterances[0].text == "hello"


@pytest.mark.parametrize(
    "fn, content, match",
    [
        (parse_lines, " \n\n", "no text in it"),
        (parse_csv, "id,body\n1,x\n", r"expected a column named 'text' .* found \['id', 'body'\]"),
        (parse_csv, "text\n", "header but no rows"),
        (parse_csv, "text,x\n ,1\n", "line 2, column 'text': the text is empty"),
        (parse_jsonl, "{not json}\n", "line 1: not valid JSON"),
        (parse_jsonl, '{"text": 5}\n', "expected text, got int"),
    ],
)
def test_bad_documents(fn, content, match):
    with pytest.raises(ValueError, match=match):
        fn(content, "src")


def test_read_document_by_extension_and_encoding(tmp_path):
    (tmp_path / "a.csv").write_text("text\nhello\n")
    (tmp_path / "a.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "a.txt").write_bytes("\ufeffhello\n".encode())
    assert [read_document(tmp_path / f).kind for f in ("a.csv", "a.jsonl", "a.txt")] == ["csv", "jsonl", "lines"]
    assert read_document(tmp_path / "a.txt").utterances[0].text == "hello", "a UTF-8 BOM is dropped"
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfeh\x00i\x00")
    with pytest.raises(ValueError, match=r"bad.txt: not UTF-8 text \(invalid start byte at byte 0\)"):
        read_document(tmp_path / "bad.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_document(tmp_path / "nope.txt")
