"""Structured output on llguidance: compiles a request's Constraint once (RPC threads) and gives each
constrained stream a TokenMatcher that the engine thread asks for the next-token bitmask every decode step.

Why llguidance (bench/results/2026-11-23-cpu-grammar-engines): a schema compiles in about a millisecond
against xgrammar's hundreds (compile sits in a request's TTFT), masks take tens of microseconds, and its
wheel is abi3 with no dependencies. Syntax: "regex" is Rust regex syntax (no look-around, no
back-references) matched against the whole output; "grammar" is llguidance's Lark dialect; "json_schema"
is JSON Schema as llguidance supports it (unsupported keywords are refused, not ignored).

Mask layout: int32 words, bit (t % 32) of word t // 32 set <=> token t may come next, the layout of
llguidance's and the fused sampler's bitmasks.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future
from copy import copy
from dataclasses import dataclass

import llguidance
import numpy as np
import tokenizers.decoders

from hjcg.requests import CONSTRAINT_KINDS, Constraint, RequestError

log = logging.getLogger(__name__)

MAX_CONSTRAINT_CHARS = 64 * 1024    # a longer schema/grammar/regex is refused before compiling
DEFAULT_CACHE_ENTRIES = 256
# No free whitespace between JSON tokens: a sampled model can otherwise spend its whole budget on blanks.
_JSON_OPTIONS = {"whitespace_flexible": False}
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a ByteFallback token


def mask_words_for(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


@dataclass(frozen=True, slots=True, eq=False)
class CompiledConstraint:
    """A checked constraint: a matcher in its start state (copied per stream; never advanced itself) and
    the first mask, the same for every stream, so a new stream's first step costs a copy."""
    constraint: Constraint
    prototype: llguidance.LLMatcher
    first_mask: np.ndarray          # int32 [mask_words] in the model's vocabulary


class TokenMatcher:
    """One stream's position in its constraint; used by the engine thread only."""

    def __init__(self, compiled: CompiledConstraint, compiler: ConstraintCompiler) -> None:
        self._matcher = compiled.prototype.deep_copy()
        self._compiler = compiler
        self._pending_first: np.ndarray | None = compiled.first_mask
        self._ended = False             # an EOS was accepted, or the stream can only end (see fill_mask)
        self.error: str | None = None   # set when accept got a token the constraint refuses

    @property
    def done(self) -> bool:
        return self._ended or self._matcher.is_stopped()

    def fill_mask(self, out: np.ndarray) -> None:
        """Writes the allowed next tokens into `out` (int32 [mask_words])."""
        if self._ended or self.error is not None:
            self._compiler.eos_only(out)
            return
        if self._pending_first is not None:
            np.copyto(out, self._pending_first)
            self._pending_first = None
            return
        if not self._compiler.fill(self._matcher, out):
            # Every token the grammar wants lies past the model's vocabulary: end the stream rather than
            # hand the sampler an empty row.
            log.warning("constraint dead end: no allowed token within the model vocabulary; ending the stream")
            self._ended = True
            self._compiler.eos_only(out)

    def accept(self, token: int) -> None:
        self._pending_first = None
        if self._ended or self.error is not None:
            return
        if token in self._compiler.eos_ids:
            self._ended = True
            return
        if not self._matcher.consume_token(token):
            self.error = self._matcher.get_error()
            log.warning("constrained stream got a token its mask refused (%d): %s", token, self.error[:200])


class ConstraintCompiler:
    """Owns the llguidance tokenizer (built once, about half a second) and a bounded cache of compiled
    constraints. compile() is safe from many threads; a constraint being compiled by one thread is waited
    for, not compiled again, by the others."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: set[int], cache_entries: int = DEFAULT_CACHE_ENTRIES) -> None:
        self.vocab_size = vocab_size
        self.mask_words = mask_words_for(vocab_size)
        self.eos_ids = frozenset(int(t) for t in eos_ids if 0 <= int(t) < vocab_size)
        if not self.eos_ids:
            raise ValueError(f"no EOS token among {sorted(eos_ids)} lies within the model vocabulary ({vocab_size})")
        self._llg_vocab, self._tokenizer = _llg_tokenizer(tokenizer, vocab_size, sorted(self.eos_ids))
        self._llg_words = mask_words_for(self._llg_vocab)
        self._eos_row = np.zeros(self.mask_words, np.int32)
        for t in self.eos_ids:
            self._eos_row.view(np.uint32)[t // 32] |= np.uint32(1 << (t % 32))
        # Bits of the last word past vocab_size (the model has no such tokens).
        tail = vocab_size % 32
        self._last_word_keep = np.uint32((1 << tail) - 1) if tail else np.uint32(0xFFFFFFFF)
        self._scratch = threading.local()
        self._lock = threading.Lock()
        self._cache: OrderedDict[Constraint, CompiledConstraint] = OrderedDict()
        self._pending: dict[Constraint, Future] = {}
        self.cache_entries = cache_entries

    # ---- compiling ----

    def compile(self, constraint: Constraint) -> CompiledConstraint:
        with self._lock:
            hit = self._cache.get(constraint)
            if hit is not None:
                self._cache.move_to_end(constraint)
                return hit
            future = self._pending.get(constraint)
            owner = future is None
            if owner:
                future = self._pending[constraint] = Future()
        if not owner:
            return future.result()
        try:
            compiled = self._compile_uncached(constraint)
        except BaseException as exc:
            with self._lock:
                del self._pending[constraint]
            future.set_exception(exc)
            raise
        with self._lock:
            del self._pending[constraint]
            self._cache[constraint] = compiled
            while len(self._cache) > self.cache_entries:
                self._cache.popitem(last=False)
        future.set_result(compiled)
        return compiled

    def cached(self) -> int:
        with self._lock:
            return len(self._cache)

    def _compile_uncached(self, constraint: Constraint) -> CompiledConstraint:
        grammar = llguidance_grammar(constraint)
        prototype = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if prototype.is_error():
            raise RequestError(f"constraint {constraint.kind}: {_first_lines(prototype.get_error())}")
        first = np.zeros(self.mask_words, np.int32)
        # Computing the first mask here also builds the lexer states every copy shares, which would
        # otherwise cost the engine thread milliseconds on the stream's first step.
        if not self.fill(prototype, first):
            raise RequestError(f"constraint {constraint.kind}: no token of the model's vocabulary can start the output")
        first.setflags(write=False)
        return CompiledConstraint(constraint, prototype, first)

    def matcher(self, compiled: CompiledConstraint) -> TokenMatcher:
        return TokenMatcher(compiled, self)

    # ---- masks ----

    def fill(self, matcher: llguidance.LLMatcher, out: np.ndarray) -> bool:
        """Computes `matcher`'s mask into `out` in the model's vocabulary; False when no token is allowed."""
        if out.dtype != np.int32 or out.shape != (self.mask_words,) or not out.flags.c_contiguous:
            raise ValueError(f"a mask row is int32 [{self.mask_words}] and contiguous, got {out.dtype} {out.shape}")
        if self._llg_vocab == self.vocab_size:
            # llguidance knows exactly the model's tokens: nothing to clear, and it always allows something
            # (EOS at the least) in a matcher that is not in error.
            matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
            return True
        target = getattr(self._scratch, "row", None)
        if target is None:
            target = self._scratch.row = np.empty(self._llg_words, np.int32)
        matcher.unsafe_compute_mask_ptr(target.ctypes.data, target.nbytes)
        out[:] = target[: self.mask_words]
        out.view(np.uint32)[-1] &= self._last_word_keep
        return bool(out.any())

    def eos_only(self, out: np.ndarray) -> None:
        np.copyto(out, self._eos_row)


def _llg_tokenizer(tokenizer, vocab_size: int, eos: list[int]) -> tuple[int, llguidance.LLTokenizer]:
    """llguidance's view of the tokenizer, cut to the model's vocabulary; returns (its vocab size, it).

    A model vocabulary smaller than the tokenizer's (a random-weights model served with a larger tokenizer)
    would otherwise leave llguidance forcing strings as tokens the model lacks (it forces the canonical
    tokenization of text the grammar fixes, e.g. '{"' of a JSON object), a dead end. Where the tokenizer
    cannot be cut, llguidance keeps the full one and fill() clears the bits past the model's vocabulary."""
    backend = copy(tokenizer.backend_tokenizer)  # what llguidance.hf.from_tokenizer reads, padding off
    backend.no_padding()
    backend.no_truncation()
    text = backend.to_str()
    size = backend.get_vocab_size(with_added_tokens=True)
    chain = isinstance(backend.decoder, tokenizers.decoders.Sequence)
    # the JSON is parsed (~25 ms) only for an edit: a decoder chain to look at, a vocabulary to cut; and once for both
    spec = json.loads(text) if chain or vocab_size < size else None
    if chain and _byte_level_decoder_alone(spec):
        text = None  # edited: written out again below if the cut does not take its place
    if vocab_size < size:
        try:
            return vocab_size, llguidance.LLTokenizer(_cut_tokenizer_json(spec, vocab_size), n_vocab=vocab_size,
                                                      eos_token=eos)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("cannot cut the tokenizer to the model's %d tokens (%s); masks clear the rest", vocab_size, exc)
    n_vocab = max(size, vocab_size)
    return n_vocab, llguidance.LLTokenizer(json.dumps(spec) if text is None else text, n_vocab=n_vocab, eos_token=eos)


def _byte_level_decoder_alone(spec: dict) -> bool:
    """Cuts a decoder chain that ends in ByteLevel to that ByteLevel step, in the tokenizer's parsed JSON `spec`;
    returns whether it did.

    transformers 5.17 converts GGUF's byte-level BPE tokenizers with ByteFallback, Fuse and Replace('▁')
    ahead of ByteLevel. They change no token of a byte-level vocabulary (its characters never include '▁',
    and no token spells '<0xNN>'), so the text decodes as before; but llguidance, seeing ByteFallback, reads
    the tokens as text instead of bytes: 'Ā' (byte 0x00) became an allowed character inside JSON strings."""
    decoder = spec.get("decoder") or {}
    steps = decoder.get("decoders") if decoder.get("type") == "Sequence" else None
    if not steps or steps[-1].get("type") != "ByteLevel" or not all(map(_spares_byte_level_tokens, steps[:-1])):
        return False
    vocab = spec.get("model", {}).get("vocab")
    if not isinstance(vocab, dict) or any(_BYTE_PIECE.fullmatch(p) or "\u2581" in p for p in vocab):
        return False  # those steps would change some token: llguidance gets the chain as it is
    spec["decoder"] = steps[-1]
    return True


def _spares_byte_level_tokens(step: dict) -> bool:
    """A decoder step that leaves byte-level tokens without '▁' or '<0xNN>' as they are."""
    kind = step.get("type")
    return kind in ("ByteFallback", "Fuse") or (kind == "Replace" and step.get("pattern") == {"String": "\u2581"})


def _cut_tokenizer_json(spec: dict, vocab_size: int) -> str:
    """A Hugging Face tokenizer (its JSON form, from its parsed `spec`, which is left as it is) without the tokens
    >= vocab_size, and without the BPE merges that would produce them, so that it only ever tokenizes into the
    model's vocabulary."""
    model = dict(spec["model"])
    vocab = model["vocab"]
    if isinstance(vocab, dict):
        model["vocab"] = kept = {piece: i for piece, i in vocab.items() if i < vocab_size}
    else:                                   # Unigram: a list of [piece, score] in id order
        model["vocab"] = vocab[:vocab_size]
        kept = {entry[0]: i for i, entry in enumerate(model["vocab"])}
    if model.get("type") == "BPE":
        pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
        model["merges"] = [m for m in pairs if m[0] in kept and m[1] in kept and m[0] + m[1] in kept]
    added = [t for t in spec.get("added_tokens", []) if t["id"] < vocab_size]
    return json.dumps(dict(spec, model=model, added_tokens=added))


def llguidance_grammar(constraint: Constraint) -> str:
    """The llguidance grammar (its JSON form) for a constraint; RequestError for what is wrong on its face.
    The grammar's own validity is checked when a matcher is built from it."""
    kind, value = constraint.kind, constraint.value
    if kind not in CONSTRAINT_KINDS:
        raise RequestError(f"unknown constraint kind {kind!r}; expected one of {', '.join(CONSTRAINT_KINDS)}")
    if not isinstance(value, str):
        raise RequestError(f"constraint {kind}: the value must be a string, got {type(value).__name__}")
    if len(value) > MAX_CONSTRAINT_CHARS:
        raise RequestError(f"constraint {kind}: {len(value)} characters is too large (at most {MAX_CONSTRAINT_CHARS})")
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=_JSON_OPTIONS)
    if kind == "json_schema":
        try:
            schema = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RequestError(f"constraint json_schema: the schema is not valid JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise RequestError(f"constraint json_schema: a schema is a JSON object (or true/false), got {type(schema).__name__}")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
    if not value:
        raise RequestError(f"constraint {kind}: the value is empty")
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(value)
    return llguidance.LLMatcher.grammar_from_lark(value)


def _first_lines(message: str, limit: int = 600) -> str:
    # llguidance appends parser state dumps to some errors; the client needs the first lines.
    message = message.strip()
    return message if len(message) <= limit else message[:limit] + " ..."
