"""Grammar-engine lab (CPU): xgrammar against llguidance on the embedded SmolLM2 tokenizer (49152 tokens),
then the chosen one through hjcg.constraints. Per engine: tokenizer build time; per constraint (JSON
schemas, json_object, a regex, a Lark grammar): compile time, per-token mask and accept time over seeded
random walks (median/p99) and whether every walk's output is valid; errors on bad inputs; a JSON-schema
keyword probe; dependencies and installed size. Writes OUT/grammar_engines.json.

    python -m bench.lab.grammar_engines OUT_DIR [--walks 20] [--xgrammar-path DIR]

xgrammar imports only with apache-tvm-ffi, which hjcg does not install: --xgrammar-path names a folder
holding it (pip install --no-deps --target DIR apache-tvm-ffi).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import random
import re
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import environment, summary

VOCAB = 49152
EOS = 2          # <|im_end|>, SmolLM2-Instruct's EOS
MAX_WALK_TOKENS = 300

_S = {"type": "string", "maxLength": 16}
SCHEMAS = {
    "flat": {"type": "object", "additionalProperties": False, "required": ["name", "age", "active"],
             "properties": {"name": _S, "age": {"type": "integer", "minimum": 0, "maximum": 150},
                            "active": {"type": "boolean"}}},
    "nested": {"type": "object", "additionalProperties": False, "required": ["user"],
               "properties": {"user": {"type": "object", "additionalProperties": False, "required": ["id", "address"],
                                       "properties": {"id": {"type": "integer"}, "nick": _S,
                                                      "address": {"type": "object", "additionalProperties": False,
                                                                  "required": ["city", "zip"],
                                                                  "properties": {"city": _S, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}}},
    "array": {"type": "object", "additionalProperties": False, "required": ["items"],
              "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 4,
                                       "items": {"type": "object", "additionalProperties": False, "required": ["sku", "qty"],
                                                 "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                                                                "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                                                                "price": {"type": "number", "minimum": 0, "maximum": 1000}}}}}},
    "enums": {"type": "object", "additionalProperties": False, "required": ["status", "priority", "kind", "tag"],
              "properties": {"status": {"enum": ["open", "closed", "pending review"]}, "priority": {"enum": [1, 2, 3]},
                             "kind": {"const": "ticket"}, "tag": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 8}]}}},
    "patterns": {"type": "object", "additionalProperties": False, "required": ["code", "date", "email"],
                 "properties": {"code": {"type": "string", "pattern": "^[a-f0-9]{8}$"}, "date": {"type": "string", "format": "date"},
                                "email": {"type": "string", "pattern": "^[a-z]{2,8}@[a-z]{2,8}\\.(com|org)$"}}},
}
REGEX = r"[a-z]{3,10}@[a-z]{3,8}\.(com|org|net)"
LARK = """start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,4}/
"""
# (name, kind, value): what every engine compiles and walks.
CONSTRAINTS = ([(f"schema_{n}", "json_schema", json.dumps(s)) for n, s in SCHEMAS.items()]
               + [("json_object", "json_object", ""), ("regex", "regex", REGEX), ("lark_arith", "grammar", LARK)])
BAD_INPUTS = [("invalid JSON", "json_schema", '{"type": "object"'),
              ("schema of wrong type", "json_schema", "[1, 2]"),
              ("unknown type", "json_schema", '{"type": "strin"}'),
              ("unsupported keyword (not)", "json_schema", '{"type": "object", "not": {"required": ["a"]}}'),
              ("bad regex", "regex", "(ab"),
              ("bad grammar", "grammar", "start: expr\nexpr: (")]
KEYWORD_PROBE = {
    "minLength/maxLength": {"type": "string", "minLength": 2, "maxLength": 5},
    "pattern": {"type": "string", "pattern": "^a+b$"},
    "format: date-time": {"type": "string", "format": "date-time"},
    "format: email": {"type": "string", "format": "email"},
    "format: uuid": {"type": "string", "format": "uuid"},
    "minimum/maximum": {"type": "integer", "minimum": -5, "maximum": 5},
    "exclusiveMinimum (number)": {"type": "number", "exclusiveMinimum": 0},
    "multipleOf": {"type": "integer", "multipleOf": 3},
    "enum": {"enum": ["a", 1, None]},
    "const": {"const": {"a": 1}},
    "anyOf": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    "oneOf": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}, {"required": ["a"]}]},
    "$ref/$defs": {"$defs": {"p": {"type": "integer"}}, "type": "object", "properties": {"a": {"$ref": "#/$defs/p"}}},
    "recursive $ref": {"$defs": {"n": {"type": "object", "properties": {"c": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}},
                       "$ref": "#/$defs/n"},
    "minItems/maxItems": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
    "prefixItems": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]},
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "additionalProperties: schema": {"type": "object", "additionalProperties": {"type": "integer"}},
    "patternProperties": {"type": "object", "patternProperties": {"^x_": {"type": "integer"}}},
    "minProperties/maxProperties": {"type": "object", "minProperties": 1, "maxProperties": 2},
    "type list": {"type": ["string", "null"]},
    "not": {"not": {"type": "string"}},
    "if/then/else": {"if": {"type": "integer"}, "then": {"minimum": 0}, "else": {"type": "string"}},
    "dependentRequired": {"type": "object", "dependentRequired": {"a": ["b"]}},
}


def load_tokenizer():
    from transformers import AutoTokenizer

    from hjcg import model_source

    model_source._offline()
    _, path = model_source.resolve("smollm2")
    return AutoTokenizer.from_pretrained(path)


class LLGuidance:
    name = "llguidance"
    dist = "llguidance"

    def __init__(self, tokenizer) -> None:
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=VOCAB, eos_token=[EOS])

    def compile(self, kind: str, value: str):
        opts = {"whitespace_flexible": False}
        m = self.llg.LLMatcher
        grammar = {"json_schema": lambda: m.grammar_from_json_schema(value, overrides=opts),
                   "json_object": lambda: m.grammar_from_json_schema({"type": "object"}, overrides=opts),
                   "regex": lambda: m.grammar_from_regex(value), "grammar": lambda: m.grammar_from_lark(value)}[kind]()
        matcher = m(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, matcher, row: np.ndarray) -> None:
        matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def accept(self, matcher, token: int) -> None:
        if token != EOS and not matcher.consume_token(token):
            raise AssertionError(matcher.get_error())

    def done(self, matcher) -> bool:
        return matcher.is_stopped()


class XGrammar:
    name = "xgrammar"
    dist = "xgrammar"

    def __init__(self, tokenizer) -> None:
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB, stop_token_ids=[EOS])
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)

    def compile(self, kind: str, value: str):
        c = self.compiler
        compact = {"any_whitespace": False, "separators": (",", ":")}
        return {"json_schema": lambda: c.compile_json_schema(value, **compact),
                "json_object": lambda: c.compile_json_schema('{"type": "object"}', **compact),
                "regex": lambda: c.compile_regex(value), "grammar": lambda: c.compile_lark(value)}[kind]()

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, row: np.ndarray) -> None:
        matcher.fill_next_token_bitmask(row[None, :])

    def accept(self, matcher, token: int) -> None:
        if not matcher.accept_token(token):
            raise AssertionError(f"xgrammar refused token {token}")

    def done(self, matcher) -> bool:
        return matcher.is_terminated()


class HjcgConstraints:
    """The chosen engine through hjcg.constraints, the path the engine thread takes."""
    name = "hjcg.constraints"
    dist = "llguidance"

    def __init__(self, tokenizer) -> None:
        from hjcg.constraints import ConstraintCompiler

        self.compiler = ConstraintCompiler(tokenizer, VOCAB, {EOS}, cache_entries=0)

    def compile(self, kind: str, value: str):
        from hjcg.requests import Constraint

        return self.compiler.compile(Constraint(kind, value))

    def matcher(self, compiled):
        return self.compiler.matcher(compiled)

    def fill(self, matcher, row: np.ndarray) -> None:
        matcher.fill_mask(row)

    def accept(self, matcher, token: int) -> None:
        matcher.accept(token)

    def done(self, matcher) -> bool:
        return matcher.done


def allowed_tokens(row: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little")[:VOCAB])


def walk(engine, compiled, rng: random.Random, short: np.ndarray) -> tuple[list[int], list[float], list[float]]:
    """One output: EOS as soon as it is allowed, else half the time a one-byte token (closes strings and
    brackets, so walks end), else any allowed token. Returns tokens, mask times, accept times (seconds)."""
    matcher = engine.matcher(compiled)
    row = np.zeros((VOCAB + 31) // 32, np.int32)
    tokens, fills, accepts = [], [], []
    while not engine.done(matcher) and len(tokens) < MAX_WALK_TOKENS:
        t0 = time.perf_counter()
        engine.fill(matcher, row)
        fills.append(time.perf_counter() - t0)
        allowed = allowed_tokens(row)
        one_byte = allowed[short[allowed]]
        if EOS in allowed:
            token = EOS
        elif len(one_byte) and rng.random() < 0.5:
            token = int(rng.choice(one_byte))
        else:
            token = int(rng.choice(allowed))
        t0 = time.perf_counter()
        engine.accept(matcher, token)
        accepts.append(time.perf_counter() - t0)
        tokens.append(token)
        if token == EOS:
            break
    return tokens, fills, accepts


def valid(kind: str, value: str, text: str) -> bool:
    import jsonschema

    if kind == "regex":
        return re.fullmatch(value, text) is not None
    if kind == "grammar":
        return re.fullmatch(r"[0-9()+\-*/]+", text) is not None and _balanced(text)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return False
    schema = json.loads(value) if kind == "json_schema" else {"type": "object"}
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).is_valid(doc)


def _balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def measure(engine_cls, tokenizer, walks: int, short: np.ndarray) -> dict:
    t0 = time.perf_counter()
    engine = engine_cls(tokenizer)
    report = {"tokenizer_build_ms": (time.perf_counter() - t0) * 1e3, "constraints": {}}
    all_fills: list[float] = []
    for name, kind, value in CONSTRAINTS:
        t0 = time.perf_counter()
        compiled = engine.compile(kind, value)
        compile_ms = (time.perf_counter() - t0) * 1e3
        rng = random.Random(0)
        fills, accepts, first, lengths, invalid, unfinished = [], [], [], [], [], 0
        for _ in range(walks):
            tokens, f, a = walk(engine, compiled, rng, short)
            first.append(f[0])
            fills += f
            accepts += a
            lengths.append(len(tokens))
            text = tokenizer.decode([t for t in tokens if t != EOS])
            if len(tokens) >= MAX_WALK_TOKENS and tokens[-1] != EOS:
                unfinished += 1      # cut off by the walk's length limit: not judged
            elif not valid(kind, value, text):
                invalid.append(text[:200])
        all_fills += fills
        report["constraints"][name] = {
            "compile_ms": compile_ms, "mask_us": _us(summary(fills)), "first_mask_us": _us(summary(first)),
            "accept_us": _us(summary(accepts)), "tokens_per_walk": sum(lengths) / len(lengths),
            "valid": f"{walks - unfinished - len(invalid)}/{walks - unfinished}", "unfinished": unfinished, "invalid_examples": invalid[:3], "example": text[:200]}
        c = report["constraints"][name]
        print(f"{engine.name:17s} {name:16s} compile {compile_ms:8.2f} ms  mask median {c['mask_us']['median_us']:7.1f} "
              f"p99 {c['mask_us']['p99_us']:8.1f} us  first {c['first_mask_us']['median_us']:8.1f} us  valid {c['valid']}", flush=True)
    report["mask_all_us"] = _us(summary(all_fills))
    report["bad_inputs"] = {label: _error_of(engine, kind, value) for label, kind, value in BAD_INPUTS}
    report["keywords"] = {label: _error_of(engine, "json_schema", json.dumps(s)) or "ok" for label, s in KEYWORD_PROBE.items()}
    return report


def _us(ms_summary: dict) -> dict:
    return {k.replace("_ms", "_us"): (v * 1e3 if k.endswith("_ms") else v) for k, v in ms_summary.items()}


def _error_of(engine, kind: str, value: str) -> str | None:
    """The error compiling gives (type: first line), or None when it compiled."""
    try:
        engine.compile(kind, value)
    except Exception as exc:  # noqa: BLE001 - recording what each engine raises is the point
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"
    return None


def dist_facts(dist: str) -> dict:
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return {"installed": False}
    size = sum((f.size or 0) for f in d.files or [])
    wheel = (d.read_text("WHEEL") or "").splitlines()
    return {"version": d.version, "requires": d.requires or [], "installed_bytes": size,
            "wheel_tags": [line.split(": ", 1)[1] for line in wheel if line.startswith("Tag:")]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--walks", type=int, default=20)
    parser.add_argument("--xgrammar-path", help="a folder holding apache-tvm-ffi, put on sys.path for xgrammar")
    args = parser.parse_args()
    tokenizer = load_tokenizer()
    # One-byte tokens (the walks' way to close strings and brackets).
    short = np.array([len(tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(i)]).encode()) == 1
                      for i in range(VOCAB)])
    report = {"environment": environment(), "vocab": VOCAB, "walks": args.walks, "engines": {}}
    for engine_cls in (LLGuidance, XGrammar, HjcgConstraints):
        facts = dist_facts(engine_cls.dist)
        if engine_cls is XGrammar:
            facts["tvm_ffi_path"] = args.xgrammar_path
            if args.xgrammar_path:
                sys.path.insert(0, args.xgrammar_path)
        try:
            facts.update(measure(engine_cls, tokenizer, args.walks, short))
        except ImportError as exc:
            facts["import_error"] = str(exc)
            print(engine_cls.name, "does not import:", exc, flush=True)
        report["engines"][engine_cls.name] = facts
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "grammar_engines.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
