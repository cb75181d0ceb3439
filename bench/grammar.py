"""``make bench-grammar``: grammar engines for constrained decoding, and the cost of decodelab's constraint.

Part 1, ``engines`` (needs the candidates installed: ``pip install llguidance xgrammar outlines-core``; a missing one
is reported and skipped). On the embedded SmolLM2-135M-Instruct tokenizer (49,152 tokens) it measures, per engine:

- set-up: building the engine's tokenizer index once (ms);
- per case (JSON schemas, a regex, a Lark grammar, any JSON object): compile time (ms) and **mask time per token**
  (µs): a valid document of the case is tokenized and fed token by token; before each token the engine fills the
  49,152-bit mask of allowed next tokens (timed), then the token is consumed. Every token must be allowed;
- schema coverage: for each JSON-schema keyword, a schema using it, one valid and one invalid document. ``enforced``:
  the engine accepts the valid one and rejects the invalid one; ``refused``: compiling fails with an error (the
  honest answer for a keyword it cannot enforce); ``IGNORED``: it compiles but accepts the invalid document (a
  silent gap); ``WRONG``: it rejects the valid document.

Part 2, ``overhead`` (decodelab itself, the chosen engine): greedy ``lm.generate`` over the same prompts with and
without ``json_schema``; per decode step, the model's step time and the constraint processor's time (mask computed,
state advanced, applied to the (B, V) scores), and end-to-end ms per token with and without the constraint.
``--unconstrained-only`` times only unconstrained generation (run it with ``PYTHONPATH`` pointing at an older
checkout's ``src`` to compare unconstrained speed before and after). ``--prompts N`` / ``--tokens`` / ``--rounds``
shorten it; ``--threads 1`` keeps the model step from stalling in OpenMP barriers on an oversubscribed machine.

The CPU model is printed and everything is written to ``bench/results/grammar-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pathlib
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from decodelab.fastpath.kernel_choice import cpu_model  # noqa: E402


def _compact(x) -> str:
    return json.dumps(x, separators=(",", ":"))


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["admin", "user", "guest"]}, "maxItems": 3},
    },
    "required": ["name", "age", "email", "tags"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "$defs": {"item": {"type": "object", "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "qty": {"type": "integer", "minimum": 1},
        "price": {"type": "number"}}, "required": ["sku", "qty", "price"], "additionalProperties": False}},
    "properties": {
        "id": {"type": "integer"},
        "status": {"enum": ["new", "paid", "shipped"]},
        "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
    "required": ["id", "status", "items", "note"],
    "additionalProperties": False,
}
LARK = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]+(\.[0-9]+)?/
"""
REGEX = r"[A-Z][a-z]{1,15} [A-Z][a-z]{1,15}, born (19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])\."

CASES = [  # (name, kind, spec, a valid document)
    ("schema: person", "json", PERSON, _compact({"name": "Ada Lovelace", "age": 36, "email": "ada@example.org",
                                               "tags": ["admin", "user"]})),
    ("schema: order ($ref, pattern, anyOf)", "json", ORDER, _compact({
        "id": 1042, "status": "paid", "items": [{"sku": "ABC-1234", "qty": 2, "price": 9.5},
                                                {"sku": "XYZ-0001", "qty": 1, "price": 120.0}], "note": None})),
    ("any JSON object", "json", {"type": "object"}, _compact({"title": "Structured outputs", "year": 2026,
                                                             "tags": ["json", "grammar"], "ok": True})),
    ("regex", "regex", REGEX, "Grace Hopper, born 1906-12-09."),
    ("Lark grammar (arithmetic)", "lark", LARK, "(12+3.5)*4-(7/2)+100*(3-1)"),
]

# keyword -> (schema, valid document, invalid document)
COVERAGE = {
    "required": ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, {"a": 1}, {}),
    "additionalProperties": ({"type": "object", "properties": {"a": {"type": "integer"}},
                              "additionalProperties": False}, {"a": 1}, {"a": 1, "b": 2}),
    "enum": ({"enum": ["red", "green"]}, "red", "blue"),
    "const": ({"const": "x"}, "x", "y"),
    "minLength/maxLength": ({"type": "string", "minLength": 2, "maxLength": 3}, "ab", "abcd"),
    "pattern": ({"type": "string", "pattern": "^[a-z]+$"}, "abc", "ab1"),
    "format: date": ({"type": "string", "format": "date"}, "2024-01-02", "2024-13-45"),
    "format: email": ({"type": "string", "format": "email"}, "a@b.co", "not an email"),
    "minimum/maximum": ({"type": "integer", "minimum": 1, "maximum": 10}, 5, 11),
    "exclusiveMinimum": ({"type": "number", "exclusiveMinimum": 0}, 0.5, 0),
    "multipleOf": ({"type": "integer", "multipleOf": 3}, 9, 10),
    "minItems/maxItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2}, [1],
                          [1, 2, 3]),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [1, 1]),
    "prefixItems": ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
                    [1, "a"], ["a", 1]),
    "anyOf": ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, "x", True),
    "oneOf": ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, 3, None),
    "allOf": ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]},
              {"a": 1, "b": 2}, {"a": 1}),
    "$ref (recursive)": ({"$defs": {"n": {"type": "object", "properties": {"kids": {"type": "array", "items": {
        "$ref": "#/$defs/n"}}}, "required": ["kids"], "additionalProperties": False}}, "$ref": "#/$defs/n"},
        {"kids": [{"kids": []}]}, {"kids": [{}]}),
    "patternProperties": ({"type": "object", "patternProperties": {"^x": {"type": "integer"}},
                           "additionalProperties": False}, {"xa": 1}, {"ya": 1}),
    "propertyNames": ({"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}}, {"ab": 1}, {"A1": 1}),
    "minProperties": ({"type": "object", "minProperties": 1}, {"a": 1}, {}),
    "if/then": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                 "if": {"properties": {"a": {"const": 1}}, "required": ["a"]}, "then": {"required": ["b"]}},
                {"a": 1, "b": 2}, {"a": 1}),
    "not": ({"not": {"type": "string"}}, 1, "x"),
    "dependentRequired": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                           "dependentRequired": {"a": ["b"]}}, {"a": 1, "b": 2}, {"a": 1}),
}


# --- engine adapters: same small interface (compile, new matcher, mask into a torch int32 bitmask, consume) -----------
class Llguidance:
    """llguidance (guidance-ai): Earley parser + lexer over the token trie, Rust."""

    name = "llguidance"

    def __init__(self, tokenizer, vocab: int):
        import llguidance
        import llguidance.hf

        self.ll = llguidance
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)

    def compile(self, kind, spec):
        M = self.ll.LLMatcher
        grammar = {"json": lambda: M.grammar_from_json_schema(spec), "regex": lambda: M.grammar_from_regex(spec),
                   "lark": lambda: M.grammar_from_lark(spec)}[kind]()
        err = M.validate_grammar(grammar, self.tok)
        if err:
            raise ValueError(err.splitlines()[0])
        return grammar

    def matcher(self, compiled):
        return self.ll.LLMatcher(self.tok, compiled, log_level=0)

    def fill(self, m, bitmask):
        m.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)

    def consume(self, m, token) -> bool:
        return m.consume_token(token)

    def accepting(self, m) -> bool:
        return m.is_accepting()


class Xgrammar:
    """xgrammar (mlc-ai): pushdown automaton with precomputed context-independent token masks, C++."""

    name = "xgrammar"

    def __init__(self, tokenizer, vocab: int):
        import xgrammar

        self.xg = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)

    def compile(self, kind, spec):
        c = self.compiler
        if kind == "json":
            return c.compile_json_schema(json.dumps(spec), any_whitespace=False, separators=(",", ":"), strict_mode=False)
        return c.compile_regex(spec) if kind == "regex" else c.compile_lark(spec)

    def matcher(self, compiled):
        return self.xg.GrammarMatcher(compiled)

    def fill(self, m, bitmask):
        m.fill_next_token_bitmask(bitmask.view(1, -1), 0)

    def consume(self, m, token) -> bool:
        return m.accept_token(token)

    def accepting(self, m) -> bool:
        return m.is_completed() if hasattr(m, "is_completed") else m.is_terminated()


class OutlinesCore:
    """outlines-core (dottxt): regex -> DFA over the vocabulary (JSON schema converted to a regex), Rust."""

    name = "outlines-core"

    def __init__(self, tokenizer, vocab: int):
        import outlines_core

        self.oc = outlines_core
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        special = set(tokenizer.all_special_ids)
        words: dict[bytes, list[int]] = {}
        for token, i in tokenizer.get_vocab().items():
            if i in special:
                continue
            words.setdefault(bytes(byte_of[c] for c in token), []).append(i)
        self.vocab = outlines_core.Vocabulary(tokenizer.eos_token_id, words)

    def compile(self, kind, spec):
        if kind == "lark":
            raise ValueError("no context-free grammars (regular languages only)")
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(spec)) if kind == "json" else spec
        return self.oc.Index(regex, self.vocab)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def fill(self, m, bitmask):
        m.write_mask_into(bitmask.data_ptr(), bitmask.numel(), 4)

    def consume(self, m, token) -> bool:
        try:
            m.advance(token, return_tokens=False)
            return True
        except ValueError:
            return False

    def accepting(self, m) -> bool:
        return m.is_finished() or self.vocab.get_eos_token_id() in m.get_tokens()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE token strings are written in it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


ENGINES = {"llguidance": Llguidance, "xgrammar": Xgrammar, "outlines-core": OutlinesCore}


def _allowed(bitmask, token: int) -> bool:
    return bool((int(bitmask[token // 32]) >> (token % 32)) & 1)


def _feed(engine, compiled, ids, bitmask, timed: bool):
    """Feed ``ids``; returns (mask times in µs, all tokens allowed, accepting at the end)."""
    m = engine.matcher(compiled)
    times, ok = [], True
    for t in ids:
        start = time.perf_counter()
        engine.fill(m, bitmask)
        if timed:
            times.append((time.perf_counter() - start) * 1e6)
        if not _allowed(bitmask, t) or not engine.consume(m, t):
            ok = False
            break
    return times, ok, ok and engine.accepting(m)


def bench_engines(names, tokenizer, vocab, repeats: int) -> dict:
    import torch

    out = {}
    for name in names:
        print(f"\n== {name}")
        try:
            start = time.perf_counter()
            engine = ENGINES[name](tokenizer, vocab)
            setup_ms = (time.perf_counter() - start) * 1e3
        except ImportError as exc:
            print(f"   not installed ({exc}); skipped")
            out[name] = {"error": f"not installed: {exc}"}
            continue
        bitmask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
        res = {"setup_ms": setup_ms, "cases": {}, "coverage": {}}
        print(f"   tokenizer set-up {setup_ms:.0f} ms")
        for case, kind, spec, doc in CASES:
            ids = tokenizer(doc).input_ids
            try:
                start = time.perf_counter()
                compiled = engine.compile(kind, spec)
                compile_ms = (time.perf_counter() - start) * 1e3
            except Exception as exc:  # noqa: BLE001 -- any engine error is a result here
                res["cases"][case] = {"error": str(exc).splitlines()[0][:120]}
                print(f"   {case:40s} unsupported: {res['cases'][case]['error']}")
                continue
            times: list[float] = []
            ok = accepted = True
            for _ in range(repeats):
                t, ok, accepted = _feed(engine, compiled, ids, bitmask, timed=True)
                times += t
            times.sort()
            res["cases"][case] = {"compile_ms": compile_ms, "tokens": len(ids), "all_allowed": ok,
                                  "accepted": accepted, "mask_us_mean": statistics.fmean(times),
                                  "mask_us_p50": times[len(times) // 2], "mask_us_p99": times[int(len(times) * .99)]}
            r = res["cases"][case]
            print(f"   {case:40s} compile {compile_ms:8.1f} ms  mask mean {r['mask_us_mean']:7.1f} µs  p50 "
                  f"{r['mask_us_p50']:7.1f}  p99 {r['mask_us_p99']:8.1f}  ({len(ids)} tokens, valid doc accepted: "
                  f"{ok and accepted})")
        counts: dict[str, int] = {}
        for key, (schema, good, bad) in COVERAGE.items():
            try:
                compiled = engine.compile("json", schema)
            except Exception as exc:  # noqa: BLE001
                verdict = "refused"
                detail = str(exc).splitlines()[0][:80]
            else:
                _, ok_g, acc_g = _feed(engine, compiled, tokenizer(_compact(good)).input_ids, bitmask, False)
                _, ok_b, acc_b = _feed(engine, compiled, tokenizer(_compact(bad)).input_ids, bitmask, False)
                detail = ""
                verdict = "WRONG" if not (ok_g and acc_g) else ("IGNORED" if ok_b and acc_b else "enforced")
            res["coverage"][key] = {"verdict": verdict, "detail": detail}
            counts[verdict] = counts.get(verdict, 0) + 1
        print("   coverage: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        for key, r in res["coverage"].items():
            print(f"      {key:22s} {r['verdict']:9s} {r['detail']}")
        out[name] = res
    return out


PROMPTS = ["Describe a person as JSON.", "Give me a user record.", "A JSON profile of a scientist:",
           "Who wrote Hamlet? Answer as JSON.", "Make up a customer.", "Invent a character for a story."]


def bench_overhead(lm, tokens: int, rounds: int, unconstrained_only: bool, prompts: list[str] = PROMPTS) -> dict:
    """Greedy generation with and without the constraint; per-step model and constraint times."""
    import decodelab.processors as procs_mod
    from decodelab.engine import Engine

    step_times: list[float] = []
    constraint_times: list[float] = []
    orig_step = Engine.step

    def timed_step(self, state, tokens_):
        start = time.perf_counter()
        try:
            return orig_step(self, state, tokens_)
        finally:
            step_times.append(time.perf_counter() - start)

    cls = getattr(procs_mod, "GrammarConstraint", None)
    orig_call = cls.__call__ if cls else None

    def timed_call(self, input_ids, scores):
        start = time.perf_counter()
        try:
            return orig_call(self, input_ids, scores)
        finally:
            constraint_times.append(time.perf_counter() - start)

    def run(kwargs):
        out = []
        for p in prompts:
            start = time.perf_counter()
            g = lm.generate(lm.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                           add_generation_prompt=True), max_new_tokens=tokens, **kwargs)
            out.append((time.perf_counter() - start, len(g.sequences[0].new_ids)))
        return out

    modes = {"unconstrained": {}}
    if not unconstrained_only:
        modes["json_schema (person)"] = {"json_schema": PERSON}
    lm.generate("warm up", max_new_tokens=4)
    results: dict[str, dict] = {m: {"ms_per_token": [], "step_ms": [], "constraint_ms": [], "new_tokens": []}
                                for m in modes}
    Engine.step = timed_step
    if cls:
        cls.__call__ = timed_call
    try:
        for _ in range(rounds):
            for mode, kwargs in modes.items():  # interleaved, so both see the same machine load
                step_times.clear()
                constraint_times.clear()
                runs = run(kwargs)
                r = results[mode]
                r["ms_per_token"].append(1e3 * sum(s for s, _ in runs) / sum(n for _, n in runs))
                r["new_tokens"].append(sum(n for _, n in runs))
                r["step_ms"].append(1e3 * statistics.fmean(step_times))
                if constraint_times:
                    r["constraint_ms"].append(1e3 * statistics.fmean(constraint_times))
                print(f"   round {len(r['step_ms'])} {mode:24s} {r['new_tokens'][-1]:4d} tokens, "
                      f"{r['ms_per_token'][-1]:7.2f} ms/token (prefill included), step "
                      f"{r['step_ms'][-1]:7.2f} ms" + (f", constraint {r['constraint_ms'][-1]:.3f} ms"
                                                       if constraint_times else ""), flush=True)
    finally:
        Engine.step = orig_step
        if cls:
            cls.__call__ = orig_call
    summary = {}
    for mode, r in results.items():
        s = {k: statistics.median(v) for k, v in r.items() if v}
        if "constraint_ms" in s:
            s["constraint_share_of_step"] = s["constraint_ms"] / s["step_ms"]
        summary[mode] = {**s, "rounds": r}
        print(f"   {mode:24s} {s['ms_per_token']:6.2f} ms/token end to end, model step {s['step_ms']:6.2f} ms"
              + (f", constraint {s['constraint_ms']:.3f} ms per step = {100 * s['constraint_share_of_step']:.1f} % "
                 "of the step" if "constraint_ms" in s else ""))
    if "json_schema (person)" in summary:
        u, c = summary["unconstrained"]["ms_per_token"], summary["json_schema (person)"]["ms_per_token"]
        summary["end_to_end_overhead"] = c / u - 1
        print(f"   end-to-end: constrained {100 * (c / u - 1):+.1f} % ms/token against unconstrained")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["engines", "overhead", "all"], default="all")
    ap.add_argument("--engines", default="llguidance,xgrammar,outlines-core")
    ap.add_argument("--repeats", type=int, default=20, help="passes over each case's document (engines)")
    ap.add_argument("--tokens", type=int, default=64, help="max new tokens per generation (overhead)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (overhead)")
    ap.add_argument("--unconstrained-only", action="store_true")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the chat prompts (overhead)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 avoids thread stalls on a busy machine)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    bad = [n for n in names if n not in ENGINES]
    if bad:
        print(f"error: unknown engine {bad[0]!r} (known: {', '.join(ENGINES)})", file=sys.stderr)
        return 2

    import torch

    import decodelab

    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    cpu = cpu_model()
    print(f"CPU: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    lm = decodelab.load()
    vocab = lm.vocab_size
    print(f"model {lm.name}, vocabulary {vocab}")
    result: dict = {"cpu": cpu, "cores": os.cpu_count(), "vocab": vocab, "date": dt.datetime.now().isoformat(),
                    "args": vars(args)}
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = HERE / "results" / f"grammar-{stamp}.json"
    if args.part in ("engines", "all") and not args.unconstrained_only:
        result["engines"] = bench_engines(names, lm.tokenizer, vocab, args.repeats)
        path.write_text(json.dumps(result, indent=1))  # each part is kept even if a later one is stopped
    if args.part in ("overhead", "all"):
        print("\n== decodelab overhead (greedy, chat prompts)")
        result["overhead"] = bench_overhead(lm, args.tokens, args.rounds, args.unconstrained_only,
                                            PROMPTS[: max(1, args.prompts)])
    result["load_average"] = os.getloadavg()
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwritten {path.relative_to(HERE.parent)} (load average {result['load_average'][0]:.1f} on "
          f"{os.cpu_count()} cores: a busy machine slows the model step more than the mask)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
