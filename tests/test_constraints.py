"""hjcg.constraints through its public API on the embedded SmolLM2 tokenizer: seeded random walks over masks
must produce output that matches the constraint; bad constraints give RequestError; mask bits respect the
model's vocabulary and EOS; compile is thread-safe and its cache bounded."""
from __future__ import annotations

import json
import random
import re
import threading
from dataclasses import dataclass

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hjcg import constraints
from hjcg.constraints import ConstraintCompiler
from hjcg.requests import Constraint, RequestError

VOCAB = 49152
EOS = 2                 # <|im_end|>
MAX_STEPS = 400


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from hjcg import model_source

    model_source._offline()
    _, path = model_source.resolve("smollm2")   # the tokenizer alone: no model weights loaded
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return ConstraintCompiler(tokenizer, VOCAB, {EOS})


@dataclass
class Tokens:
    tokenizer: object
    lengths: np.ndarray     # bytes per token (byte-level BPE: one character of the token string per byte)
    closers: np.ndarray     # the tokens '"', '}', ']', ')'


@pytest.fixture(scope="module")
def toks(tokenizer):
    return Tokens(tokenizer, np.array([len(tokenizer.convert_ids_to_tokens(i)) for i in range(len(tokenizer))]),
                  np.array(tokenizer.convert_tokens_to_ids(['"', "}", "]", ")"])))


def allowed(row: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))


class Walk:
    """Drives one matcher with seeded random choices. EOS is taken as soon as it is allowed; otherwise often
    a closing token ('"', '}', ']', ')'), so walks end, else a one-byte or any allowed token. style "long"
    first prefers the longest allowed tokens (multi-character tokens such as '"}' or '":"') for LONG_STEPS
    steps, then walks as "short" (an unbounded string would never close on long tokens)."""
    LONG_STEPS = 30

    def __init__(self, compiler: ConstraintCompiler, constraint: Constraint, toks: Tokens, seed: int,
                 style: str = "short", check=None) -> None:
        self.compiler, self.toks, self.style, self.check = compiler, toks, style, check
        self.matcher = compiler.matcher(compiler.compile(constraint))
        self.rng = random.Random(seed)
        self.tokens: list[int] = []
        self.row = np.zeros(compiler.mask_words, np.int32)

    def step(self) -> np.ndarray:
        self.matcher.fill_mask(self.row)
        ok = allowed(self.row)
        assert len(ok), "an empty mask"
        assert ok[-1] < self.compiler.vocab_size
        if self.check:
            self.check(self, ok)
        lengths = self.toks.lengths[np.minimum(ok, len(self.toks.lengths) - 1)]
        closing = ok[np.isin(ok, self.toks.closers)]
        roll = self.rng.random()
        if EOS in ok:
            token = EOS
        elif self.style == "long" and len(self.tokens) < self.LONG_STEPS and roll < 0.7:
            token = int(self.rng.choice(ok[lengths >= np.sort(lengths)[-min(len(ok), 20)]]))
        elif roll < 0.4 and len(closing):
            token = int(self.rng.choice(closing))
        elif roll < 0.8 and (lengths == 1).any():
            token = int(self.rng.choice(ok[lengths == 1]))
        else:
            token = int(self.rng.choice(ok))
        self.matcher.accept(token)
        self.tokens.append(token)
        return ok

    def run(self) -> list[int]:
        while not self.matcher.done:
            assert len(self.tokens) < MAX_STEPS, f"walk did not end: {self.text()!r}"
            self.step()
        return self.tokens

    def text(self) -> str:
        return self.toks.tokenizer.decode([t for t in self.tokens if t != EOS])


# ---- JSON schemas ----

names = st.sampled_from(["a", "id", "name", "x_y", "Ünï", "with space", 'q"uote', "back\\slash"])
short_text = st.text(alphabet=st.sampled_from('abcXYZ019 _-"\\/é€\n'), max_size=6)
PATTERNS = ["^[a-z]{1,6}$", "^[0-9]{2,4}-[A-Z]$", "^(yes|no)$", "^[A-F0-9]{4}$"]


def _string():
    plain = st.integers(0, 8).flatmap(lambda hi: st.integers(0, hi).map(
        lambda lo: {"type": "string", "minLength": lo, "maxLength": hi}))
    enum = st.lists(short_text, min_size=1, max_size=4, unique=True).map(lambda v: {"enum": v})
    pattern = st.sampled_from(PATTERNS).map(lambda p: {"type": "string", "pattern": p})
    return st.one_of(plain, enum, pattern)


def _number():
    def bounded(kind):
        return st.tuples(st.integers(-1000, 1000), st.integers(0, 2000)).map(
            lambda b: {"type": kind, "minimum": b[0], "maximum": b[0] + b[1]})
    return st.one_of(bounded("integer"), bounded("number"), st.just({"type": "integer"}),
                     st.sampled_from([{"enum": [1, 2, 3]}, {"const": 7}]))


leaves = st.one_of(_string(), _number(), st.just({"type": "boolean"}), st.just({"type": "null"}))


def _object(children):
    return st.dictionaries(names, children, min_size=1, max_size=4).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda req: {"type": "object", "properties": props, "required": req, "additionalProperties": False}))


def _array(children):
    return st.tuples(children, st.integers(0, 3)).flatmap(lambda t: st.integers(0, t[1]).map(
        lambda lo: {"type": "array", "items": t[0], "minItems": lo, "maxItems": t[1]}))


def _any_of(children):
    return st.lists(children, min_size=2, max_size=3).map(lambda v: {"anyOf": v})


schemas = st.recursive(leaves, lambda c: st.one_of(_object(c), _array(c), _any_of(c)), max_leaves=6)
top_schemas = st.one_of(_object(schemas), schemas)


def _validate(schema: dict, text: str) -> None:
    doc = json.loads(text)
    jsonschema.Draft202012Validator(schema).validate(doc)


@settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(schema=top_schemas, seed=st.integers(0, 2**16))
def test_json_schema_walks_validate(compiler, toks, schema, seed):
    constraint = Constraint("json_schema", json.dumps(schema))
    for style in ("short", "long"):
        walk = Walk(compiler, constraint, toks, seed, style)
        walk.run()
        _validate(schema, walk.text())


def test_long_tokens_close_the_output(compiler, toks):
    """The last step taken by a multi-character token (e.g. '"}'): the matcher must see the whole token."""
    schema = {"type": "object", "properties": {"k": {"type": "string", "maxLength": 12}}, "required": ["k"],
              "additionalProperties": False}
    seen_long_last = 0
    for seed in range(30):
        walk = Walk(compiler, Constraint("json_schema", json.dumps(schema)), toks, seed, "long")
        walk.run()
        _validate(schema, walk.text())
        last = [t for t in walk.tokens if t != EOS][-1]
        seen_long_last += toks.lengths[last] > 1
    assert seen_long_last >= 10


def test_json_object(compiler, toks):
    for seed in range(15):
        walk = Walk(compiler, Constraint("json_object"), toks, seed, "short" if seed % 2 else "long")
        walk.run()
        assert isinstance(json.loads(walk.text()), dict)


# ---- regexes and grammars ----

REGEXES = [r"[a-z]{3,10}@[a-z]{3,8}\.(com|org)", r"[0-9]{4}-[0-9]{2}-[0-9]{2}", r"(yes|no|maybe)",
           r"[A-Z][a-z]{0,5}( [A-Z][a-z]{0,5}){0,2}", r"-?[0-9]{1,5}(\.[0-9]{1,3})?", r"a+"]


@pytest.mark.parametrize("regex", REGEXES)
def test_regex_walks_full_match_and_eos_only_when_complete(compiler, toks, regex):
    def eos_iff_complete(walk: Walk, ok: np.ndarray) -> None:
        assert (EOS in ok) == (re.fullmatch(regex, walk.text()) is not None), walk.text()

    for seed in range(8):
        walk = Walk(compiler, Constraint("regex", regex), toks, seed, ("short", "long")[seed % 2],
                    check=eos_iff_complete)
        walk.run()
        assert re.fullmatch(regex, walk.text()), walk.text()


ARITH = """start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,4}/
"""


def _parses_arith(text: str) -> bool:
    """A hand recursive-descent check of ARITH."""
    tokens = re.findall(r"[0-9]+|[-+*/()]|.", text)
    pos = 0

    def factor() -> bool:
        nonlocal pos
        if pos < len(tokens) and tokens[pos].isdigit() and len(tokens[pos]) <= 4:
            pos += 1
            return True
        if pos < len(tokens) and tokens[pos] == "(":
            pos += 1
            if expr() and pos < len(tokens) and tokens[pos] == ")":
                pos += 1
                return True
        return False

    def chain(item, ops) -> bool:
        nonlocal pos
        if not item():
            return False
        while pos < len(tokens) and tokens[pos] in ops:
            pos += 1
            if not item():
                return False
        return True

    def term() -> bool:
        return chain(factor, "*/")

    def expr() -> bool:
        return chain(term, "+-")

    return expr() and pos == len(tokens)


def test_lark_grammar(compiler, toks):
    assert _parses_arith("12+(3*4)/7") and not _parses_arith("1+") and not _parses_arith("(1") and not _parses_arith("12345")
    for seed in range(12):
        walk = Walk(compiler, Constraint("grammar", ARITH), toks, seed, ("short", "long")[seed % 2])
        walk.run()
        assert _parses_arith(walk.text()), walk.text()


def test_lark_command_language(compiler, toks):
    grammar = 'start: cmd (";" cmd)*\ncmd: "go " DIR | "say " WORD\nDIR: "north" | "south"\nWORD: /[a-z]{1,5}/\n'
    for seed in range(8):
        walk = Walk(compiler, Constraint("grammar", grammar), toks, seed)
        walk.run()
        assert re.fullmatch(r"(go (north|south)|say [a-z]{1,5})(;(go (north|south)|say [a-z]{1,5}))*", walk.text())


# ---- bad constraints ----

@pytest.mark.parametrize("constraint, words", [
    (Constraint("json_schema", '{"type": "object"'), "not valid JSON"),
    (Constraint("json_schema", "[1, 2]"), "JSON object"),
    (Constraint("json_schema", '"string"'), "JSON object"),
    (Constraint("json_schema", '{"type": "strin"}'), "strin"),
    (Constraint("json_schema", '{"type": "object", "not": {"required": ["a"]}}'), "not"),
    (Constraint("json_schema", '{"type": "string", "pattern": "(a"}'), "unclosed"),
    (Constraint("json_schema", '{"$ref": "#/$defs/missing"}'), "missing"),
    (Constraint("regex", "(ab"), "regex"),
    (Constraint("regex", ""), "empty"),
    (Constraint("grammar", "start: expr\nexpr: ("), "Expected"),
    (Constraint("grammar", "start: undefined_rule"), "undefined_rule"),
    (Constraint("xml", "<a/>"), "unknown constraint kind"),
    (Constraint("regex", "a" * (constraints.MAX_CONSTRAINT_CHARS + 1)), "too large"),
])
def test_bad_constraints_raise_request_error(compiler, constraint, words):
    with pytest.raises(RequestError, match=re.escape(words)) as info:
        compiler.compile(constraint)
    assert str(info.value).startswith(f"constraint {constraint.kind}") or "unknown constraint kind" in str(info.value)


# ---- mask bits ----

def test_model_vocab_smaller_than_tokenizer(tokenizer, toks):
    """A Llama-2-7B-shaped model (32000) served with the 49152-token tokenizer, and an odd size: no bit at
    or past the model's vocabulary, and JSON still completes (forced text is tokenized within it)."""
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}, "n": {"type": "integer"}},
              "required": ["name", "n"], "additionalProperties": False}
    for vocab in (32000, 32010):
        small = ConstraintCompiler(tokenizer, vocab, {EOS})
        assert small.mask_words == -(-vocab // 32)
        for seed in range(6):
            walk = Walk(small, Constraint("json_schema", json.dumps(schema)), toks, seed, ("short", "long")[seed % 2])
            walk.run()
            assert max(walk.tokens) < vocab
            _validate(schema, walk.text())


def test_model_vocab_larger_than_tokenizer(tokenizer, toks):
    vocab = VOCAB + 100      # padded embeddings: ids 49152.. are no token
    padded = ConstraintCompiler(tokenizer, vocab, {EOS})
    assert padded.mask_words == -(-vocab // 32)

    def nothing_past_tokenizer(walk: Walk, ok: np.ndarray) -> None:
        assert ok[-1] < VOCAB

    for kind, value in (("json_object", ""), ("regex", r"[a-z ]{0,40}"), ("grammar", ARITH)):
        for seed in range(3):
            Walk(padded, Constraint(kind, value), toks, seed, "long", check=nothing_past_tokenizer).run()


def test_fallback_when_the_tokenizer_cannot_be_cut(tokenizer, toks, monkeypatch):
    """Without a cut tokenizer the bits past the model's vocabulary are cleared; text the grammar forces as
    a token the model lacks ('{"' is 39428) is refused at compile, not left as an empty mask."""
    def refuse(*_):
        raise ValueError("not cuttable")

    monkeypatch.setattr(constraints, "_cut_tokenizer_json", refuse)
    small = ConstraintCompiler(tokenizer, 32000, {EOS})
    with pytest.raises(RequestError, match="no token of the model's vocabulary"):
        small.compile(Constraint("json_schema", '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}'))
    for seed in range(4):
        walk = Walk(small, Constraint("regex", "[0-9]{2,6}"), toks, seed, "long")
        walk.run()
        assert max(walk.tokens) < 32000 and re.fullmatch("[0-9]{2,6}", walk.text())
        # Forced text ('org' after '.o') can still be a token past the model's vocabulary mid-output: the
        # stream then ends (EOS only) instead of getting an empty mask.
        walk = Walk(small, Constraint("regex", REGEXES[0]), toks, seed, "long")
        walk.run()
        assert max(walk.tokens) < 32000 and walk.matcher.done


def test_done_and_eos(compiler, tokenizer):
    row = np.zeros(compiler.mask_words, np.int32)
    m = compiler.matcher(compiler.compile(Constraint("regex", "ab")))
    m.fill_mask(row)
    assert EOS not in allowed(row) and not m.done
    for t in tokenizer.encode("ab"):
        m.accept(t)
    m.fill_mask(row)
    assert m.done and list(allowed(row)) == [EOS]      # nothing but EOS can follow

    m = compiler.matcher(compiler.compile(Constraint("regex", "a+")))
    m.accept(tokenizer.convert_tokens_to_ids("a"))
    m.fill_mask(row)
    ok = allowed(row)
    assert EOS in ok and tokenizer.convert_tokens_to_ids("a") in ok and not m.done
    m.accept(EOS)
    assert m.done
    m.fill_mask(row)
    assert list(allowed(row)) == [EOS]


def test_special_tokens_never_in_free_text(compiler):
    row = np.zeros(compiler.mask_words, np.int32)
    m = compiler.matcher(compiler.compile(Constraint("regex", r"(.|\n){0,50}")))
    m.fill_mask(row)
    ok = set(allowed(row).tolist())
    assert EOS in ok and not ok & {0, 1}     # <|endoftext|>, <|im_start|>


def test_refused_token_ends_the_stream(compiler, tokenizer):
    row = np.zeros(compiler.mask_words, np.int32)
    m = compiler.matcher(compiler.compile(Constraint("regex", "[0-9]+")))
    m.accept(tokenizer.convert_tokens_to_ids("a"))
    assert m.done and m.error
    m.fill_mask(row)
    assert list(allowed(row)) == [EOS]


def _behind_other_decoders(tokenizer):
    """The embedded tokenizer as transformers 5.17 converts it from GGUF: the same vocabulary and text, its
    ByteLevel decoder behind ByteFallback, Fuse and Replace('▁', ' ') steps that change no byte-level token."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    decoder = spec["decoder"]
    byte_level = decoder if decoder["type"] == "ByteLevel" else decoder["decoders"][-1]  # a converter's chain already
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, byte_level]}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|im_end|>")


def test_masks_do_not_depend_on_the_decoders_before_byte_level(compiler, tokenizer):
    """A ByteFallback step ahead of ByteLevel once made llguidance read 'Ā' (token 190, byte 0x00) as the
    character Ā: it then allowed raw control characters inside JSON strings (invalid JSON on the H100)."""
    chained = _behind_other_decoders(tokenizer)
    assert chained.decode([190, 19839, 44652, 236]) == tokenizer.decode([190, 19839, 44652, 236]) == "\x00 lex厒"
    other = ConstraintCompiler(chained, VOCAB, {EOS})
    schema = Constraint("json_schema", json.dumps({"type": "object", "properties": {"name": {"type": "string"}}}))
    rows = []
    for c in (compiler, other):
        m = c.matcher(c.compile(schema))
        row = np.zeros(c.mask_words, np.int32)
        for t in tokenizer('{"name":"ab', add_special_tokens=False)["input_ids"]:
            m.fill_mask(row)
            m.accept(t)
        m.fill_mask(row)
        rows.append(row)
    assert 190 not in allowed(rows[1])
    assert np.array_equal(rows[0], rows[1])


def test_bad_mask_row(compiler):
    m = compiler.matcher(compiler.compile(Constraint("regex", "a+")))
    m.fill_mask(np.zeros(compiler.mask_words, np.int32))     # the precomputed first mask
    for bad in (np.zeros(compiler.mask_words, np.int64), np.zeros(compiler.mask_words + 1, np.int32)):
        with pytest.raises(ValueError):
            m.fill_mask(bad)


def test_eos_outside_the_vocabulary(tokenizer):
    with pytest.raises(ValueError, match="EOS"):
        ConstraintCompiler(tokenizer, 1000, {40000})


# ---- compile: threads and cache ----

def test_concurrent_compile_once_per_constraint(tokenizer, monkeypatch):
    fresh = ConstraintCompiler(tokenizer, VOCAB, {EOS})
    calls: dict[Constraint, int] = {}
    real = fresh._compile_uncached
    count_lock = threading.Lock()

    def counting(constraint):
        with count_lock:
            calls[constraint] = calls.get(constraint, 0) + 1
        return real(constraint)

    monkeypatch.setattr(fresh, "_compile_uncached", counting)
    wanted = [Constraint("json_schema", json.dumps({"type": "object", "properties": {f"k{i}": {"type": "integer"}}}))
              for i in range(4)] + [Constraint("regex", REGEXES[0]), Constraint("grammar", ARITH)]
    bad = Constraint("regex", "(")
    barrier = threading.Barrier(8)
    results: list[list] = [None] * 8
    errors: list = [None] * 8

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = [fresh.compile(c) for c in wanted]
        try:
            fresh.compile(bad)
        except RequestError as exc:
            errors[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results[1:]:
        assert all(a is b for a, b in zip(r, results[0]))
    assert all(calls[c] == 1 for c in wanted)
    assert all(isinstance(e, RequestError) for e in errors)
    # Same masks from matchers of the shared compiled constraint.
    rows = np.zeros((2, fresh.mask_words), np.int32)
    for i in range(2):
        fresh.matcher(results[i][0]).fill_mask(rows[i])
    assert (rows[0] == rows[1]).all() and rows[0].any()


def test_cache_is_bounded(tokenizer):
    small = ConstraintCompiler(tokenizer, VOCAB, {EOS}, cache_entries=3)
    cs = [Constraint("regex", f"x{i}[a-z]+") for i in range(5)]
    first = [small.compile(c) for c in cs]
    assert small.cached() == 3
    assert small.compile(cs[4]) is first[4]          # still cached
    assert small.compile(cs[0]) is not first[0]      # evicted, compiled again
    assert small.cached() == 3
