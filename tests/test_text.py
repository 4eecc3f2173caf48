"""Streaming text: UTF-8-safe deltas and stop strings that never leak into the output."""
from hjcg.text import IncrementalDetokenizer, StopStringFilter


def test_deltas_concatenate_to_the_full_decode_and_never_hold_a_broken_character(engine):
    tok = engine.tokenizer
    text = "Prix: 12€, café ☕ et 🇫🇷 — naïve façade 漢字."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(t) for t in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == tok.decode(ids)
    assert all("\ufffd" not in d for d in deltas)
    # multi-byte characters span several byte-level tokens here, so some pushes must have held text back
    assert "" in deltas[:-1]


def test_prompt_context_keeps_leading_spaces(engine):
    tok = engine.tokenizer
    prompt = tok("Hello", add_special_tokens=False)["input_ids"]
    word = tok(" world", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok, prompt)
    assert "".join(detok.push(t) for t in word) == " world"


def test_stop_string_split_over_pushes_is_held_back_then_cut():
    f = StopStringFilter(["</end>"])
    assert f.push("hello </") == ("hello ", False)
    assert f.push("en") == ("", False)
    assert f.push("d> tail") == ("", True)


def test_a_false_start_is_released():
    f = StopStringFilter(["STOP"])
    assert f.push("ST") == ("", False)
    assert f.push("AR") == ("STAR", False)
    assert f.flush() == ""


def test_without_stops_text_passes_through():
    f = StopStringFilter([])
    assert f.push("abc") == ("abc", False)


def test_earliest_of_several_stops_wins():
    f = StopStringFilter(["xyz", "b"])
    assert f.push("abcxyz") == ("a", True)
