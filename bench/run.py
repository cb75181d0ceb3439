"""``make bench``: decodelab's engine and transformers' ``model.generate``, side by side, in one process.

Same model (the embedded SmolLM2-135M-Instruct unless ``--model``), same prompts and settings; every case runs both
sides ``--runs`` times in rotating order so that both see the same machine load, checks that deterministic
outputs are identical, and records tokens/s (median, min, max, spread), seconds, peak RSS and the load average.

Cases (default all): ``greedy`` (128 new tokens), ``beam`` (5 beams, 64 tokens), ``sample`` (8 sequences, 64
tokens, seeded), ``latency`` (time to first token: ``max_new_tokens=1`` on the short prompt; prefill tokens/s on
a 512-token prompt), ``dtypes`` (greedy 128 in bfloat16, and weight-only int8 / int4 with float32 and bfloat16
activations, each with its quality figure: top-1 agreement with float32 and perplexity on bench/quality_text.txt).
``kernels``: the matrix-vector kernels alone on a decode step's worth of weights (bench/matvec_kernels.py).
Float32 cases run once per ``--kernels`` value (default ``exact,fast``: bit-exact products, and the products measured
fastest on this CPU, see decodelab.fastpath.kernel_choice; the choice of each is printed with the CPU model). ``--compile`` adds the Inductor-compiled decode step (see decodelab.compile_cache).

The bandwidth ceiling is measured first (bench/probes.py): tokens/s can at best be ``gemv GB/s / weight bytes``.
The greedy cases rerun the gemv probe after every round and report their fraction of the ceiling against the
bandwidth of their own round (the median over rounds): this machine's bandwidth drifts by up to 2x in minutes.
Results go to ``bench/results/<stamp>.json``; the table is printed. Timings on a shared machine are noisy: read the
load averages stored with every run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pathlib
import platform
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import decodelab  # noqa: E402
from cases import common_prefix, decodelab_side, generate_side, round_fraction, side_by_side  # noqa: E402
from decodelab.engine import Engine  # noqa: E402
from decodelab.fastpath.kernel_choice import cpu_model  # noqa: E402
from decodelab.quantize import quality, weight_bytes  # noqa: E402
from probes import GemvProbe, bandwidth, loadavg  # noqa: E402

PROMPT = "It was a dark and stormy night, and the old lighthouse keeper"
GREEDY = dict(max_new_tokens=128, do_sample=False, num_beams=1)
BEAM = dict(max_new_tokens=64, do_sample=False, num_beams=5)
SAMPLE = dict(max_new_tokens=64, do_sample=True, num_return_sequences=8, top_k=50, top_p=1.0, temperature=1.0)


def lm_on(loaded_lm, **engine_kw) -> decodelab.LM:
    """An LM sharing ``loaded_lm``'s model and tokenizer with its own :class:`Engine` options."""
    lm = decodelab.LM(loaded_lm.model, loaded_lm.tokenizer, loaded_lm.name)
    lm.engine = Engine(loaded_lm.model, **engine_kw)
    return lm


def strip_ids(res: dict) -> dict:
    """Drop the generated ids from a side-by-side result (kept only for the identity check)."""
    return {k: ({kk: vv for kk, vv in v.items() if kk != "ids"} if isinstance(v, dict) else v) for k, v in res.items()}


def case_pair(name, ours, theirs, runs, extra=None, probe=None) -> dict:
    print(f"  {name} ...", flush=True)
    res = side_by_side({"decodelab": ours, "generate": theirs}, runs, probe=probe)
    speedup = res["decodelab"]["tok_s"]["median"] / res["generate"]["tok_s"]["median"]
    res = strip_ids(res) | {"case": name, "speedup": speedup}
    return res | (extra or {})


def run_latency(lm, model, tok, runs, suffix: str = "") -> list[dict]:
    """Time to first token (short prompt) and prefill tokens/s (512-token prompt), both ``max_new_tokens=1``."""
    out = []
    text = (HERE / "quality_text.txt").read_text()
    long_ids = tok(text).input_ids[:512]
    long_prompt = tok.decode(long_ids)
    for label, prompt in (("ttft", PROMPT), ("prefill512", long_prompt)):
        n = len(tok(prompt).input_ids)
        kw = dict(max_new_tokens=1, do_sample=False)
        res = case_pair(label + suffix, decodelab_side(lm, prompt, **kw), generate_side(model, tok, prompt, **kw), runs)
        for side in ("decodelab", "generate"):
            secs = res[side]["seconds"]
            res[side]["prompt_tokens"] = n
            res[side]["prefill_tok_s"] = n / secs["median"]
        out.append(res)
    return out


def run_dtypes(lm32, model_name, runs, gemv_gbs, quality_ids, probe=None) -> list[dict]:
    """bfloat16, and weight-only int8 / int4 (bfloat16 activations), greedy 128 tokens, against
    ``model.generate`` on the bfloat16 model. Quality: against the float32 engine on bench/quality_text.txt.
    ``bandwidth_fraction``: against ``probe`` run in each round (else against ``gemv_gbs``)."""
    out = []
    ref_engine = lm32.engine
    greedy32 = lm32.generate(PROMPT, **GREEDY).sequences[0].new_ids
    device = lm32.engine.device
    lm16 = decodelab.load(model_name, dtype="bfloat16", device=device)
    variants = [("bfloat16", None, False), ("bfloat16 kernels=fast", "fast", False),
                ("bfloat16+int8", "int8", False), ("bfloat16+int4", "int4", False),
                ("bfloat16+int4, int8 lm_head", "int4", True)]
    for label, scheme, head in variants:
        if scheme and device.type != "cpu":
            continue  # the int8 / int4 kernels are PyTorch's CPU ones
        if scheme == "fast":
            lm, scheme = lm_on(lm16, kernels="fast"), None
        else:
            lm = lm_on(lm16, quantize=scheme, quantize_lm_head=head) if scheme else lm16
        ours = decodelab_side(lm, PROMPT, **GREEDY)
        theirs = generate_side(lm16.model, lm16.tokenizer, PROMPT, **GREEDY)
        res = case_pair(f"greedy128 {label}", ours, theirs, runs, probe=probe)
        ids = lm.generate(PROMPT, **GREEDY).sequences[0].new_ids
        ref16 = theirs()[0][0]
        if scheme:
            res["same_ids"] = None  # quantized weights: not the model generate runs
        wb = weight_bytes(lm.engine.fast)
        res.update(variant=label, quality=quality(ref_engine, lm.engine, quality_ids), weight_bytes=wb,
                   ceiling_tok_s=gemv_gbs * 1e9 / wb,
                   bandwidth_fraction=round_fraction(res, "decodelab", wb)
                   or res["decodelab"]["tok_s"]["median"] * wb / (gemv_gbs * 1e9),
                   prefix_match_f32=common_prefix(ids, greedy32), prefix_match_generate=common_prefix(ids, ref16),
                   greedy_tokens=len(ids))
        out.append(res)
    return out


def run_compile(lm32, model_name, runs, probe=None) -> list[dict]:
    """The AOT-compiled decode step (``compile=True``: Inductor freezing + max-autotune, packages cached on disk)
    against the eager fast path with the same options and against ``model.generate`` in the same dtype: greedy 128
    for float32 / bfloat16 with ``kernels="fast"`` and for int8 / int4 weights (also with the int8 output layer
    llama.cpp's Q8_0 / Q4_1 files have), and beam search 5 x 64 in float32.
    ``first_call_s``: the first generate of the engine (compiling, or loading a package an earlier run left).
    Greedy cases: ``bandwidth_fraction`` of the compiled engine, against ``probe`` run in each round."""
    out = []
    device = lm32.engine.device
    lm16 = None
    variants = [("greedy128 float32 fast", None, dict(kernels="fast"), GREEDY),
                ("beam5x64 float32 fast", None, dict(kernels="fast"), BEAM),
                ("greedy128 bfloat16 fast", "bfloat16", dict(kernels="fast"), GREEDY),
                ("greedy128 bfloat16+int8", "bfloat16", dict(quantize="int8"), GREEDY),
                ("greedy128 bfloat16+int4", "bfloat16", dict(quantize="int4"), GREEDY),
                ("greedy128 bfloat16+int8, int8 lm_head", "bfloat16", dict(quantize="int8", quantize_lm_head=True),
                 GREEDY),
                ("greedy128 bfloat16+int4, int8 lm_head", "bfloat16", dict(quantize="int4", quantize_lm_head=True),
                 GREEDY)]
    for label, dtype, engine_kw, gen_kw in variants:
        if "quantize" in engine_kw and device.type != "cpu":
            continue
        if dtype:
            lm16 = lm16 or decodelab.load(model_name, dtype=dtype, device=device)
        base = lm16 if dtype else lm32
        print(f"  compiled {label} ...", flush=True)
        try:
            start = time.perf_counter()
            clm = lm_on(base, compile=True, **engine_kw)
            clm.generate(PROMPT, **gen_kw)
            first = time.perf_counter() - start
            eager = lm_on(base, **engine_kw)
            res = side_by_side({"compiled": decodelab_side(clm, PROMPT, **gen_kw),
                                "eager": decodelab_side(eager, PROMPT, **gen_kw),
                                "generate": generate_side(base.model, base.tokenizer, PROMPT, **gen_kw)}, runs,
                               probe=probe if gen_kw is GREEDY else None)
            res["same_ids"] = res["compiled"]["ids"] == res["eager"]["ids"]
            wb = weight_bytes(clm.engine.fast)
            res.update(weight_bytes=wb, bandwidth_fraction=round_fraction(res, "compiled", wb))
            stats = {f"{b}x{c}": v for (b, c), v in clm.engine.compiled.stats.items()}
            out.append(strip_ids(res) | {"case": f"{label} compiled", "first_call_s": first, "compile_stats": stats,
                                         "speedup_vs_generate": res["compiled"]["tok_s"]["median"]
                                         / res["generate"]["tok_s"]["median"]})
        except Exception as err:  # report, do not lose the rest of the bench
            out.append({"case": f"{label} compiled", "error": f"{type(err).__name__}: {err}"[:500]})
    return out


def fmt_row(cols, widths):
    return "  ".join(str(c).ljust(w) for c, w in zip(cols, widths))


def print_table(report: dict) -> None:
    bw = report["bandwidth"]
    print(f"\nmachine: {report['machine']['cpu']} ({report['machine']['threads']} threads), torch "
          f"{report['machine']['torch']}; gemv {bw['gemv_gbs']} GB/s, copy {bw['copy_gbs']} GB/s; "
          f"load before/after {report['load_start']} / {report['load_end']}")
    widths = [34, 22, 22, 8, 6, 10, 9]
    print(fmt_row(["case", "decodelab tok/s", "generate tok/s", "speedup", "same", "RSS MiB", "ceiling"], widths))
    for r in report["cases"]:
        d, g = r["decodelab"], r["generate"]
        fmt = lambda s: f"{s['tok_s']['median']:.1f} ({s['tok_s']['min']:.1f}-{s['tok_s']['max']:.1f})"
        ceiling = f"{r['bandwidth_fraction']:.0%}" if "bandwidth_fraction" in r else ""
        if "prefill_tok_s" in d:
            fmt = lambda s: f"{s['seconds']['median'] * 1000:.0f} ms, {s['prefill_tok_s']:.0f} pf/s"
        print(fmt_row([r["case"], fmt(d), fmt(g), f"{r['speedup']:.2f}x", r["same_ids"],
                       f"{d['peak_rss_mb']:.0f}/{g['peak_rss_mb']:.0f}", ceiling], widths))
        if "quality" in r:
            q = r["quality"]
            print(f"    quality vs float32: top-1 agreement {q['top1_agreement']:.3f}, ppl {q['ppl']:.3f} vs "
                  f"{q['ppl_reference']:.3f} ({q['ppl_change']:+.2%}); greedy ids equal float32's for the first "
                  f"{r['prefix_match_f32']}/{r['greedy_tokens']} tokens, bf16 generate's for "
                  f"{r['prefix_match_generate']}; {r['weight_bytes'] / 1e6:.0f} MB/token, ceiling "
                  f"{r['ceiling_tok_s']:.0f} tok/s")
    for mode, summary in report.get("kernel_choice", {}).items():
        print(f"kernels={mode}: {summary}")
    for r in report.get("kernels", []):
        print(f"  kernel {r['kernel']:30s} {r['ms_median']:8.1f} ms per step's weights  "
              f"(<= {r['tok_s_bound']:.1f} tok/s)")
    for r in report.get("compiled", []):
        if "error" in r:
            print(f"  {r['case']}: failed: {r['error']}")
            continue
        print(f"  {r['case']}: compiled {r['compiled']['tok_s']['median']:.1f} tok/s vs eager "
              f"{r['eager']['tok_s']['median']:.1f}, generate {r['generate']['tok_s']['median']:.1f} "
              f"({r['speedup_vs_generate']:.2f}x; compiled ids = eager ids: {r['same_ids']}); first call "
              f"{r['first_call_s']:.1f} s"
              + (f"; {r['bandwidth_fraction']:.0%} of the ceiling ({r['weight_bytes'] / 1e6:.0f} MB/token)"
                 if r.get("bandwidth_fraction") else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per side and case (>= 5 for the report)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--cases", default="greedy,beam,sample,latency,dtypes,kernels", help="comma-separated case names")
    ap.add_argument("--model", default=None, help="model for decodelab.load (default: the embedded one)")
    ap.add_argument("--device", default=None, help="cpu (default) or cuda (quantized cases are CPU-only)")
    ap.add_argument("--kernels", default="exact,fast",
                    help="float32 greedy/beam/sample/latency with these engine kernels (comma-separated)")
    ap.add_argument("--compile", action="store_true", help="also bench the compiled decode step")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/<stamp>.json)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 16 new tokens per case, 1 run")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs = 1
        for kw in (GREEDY, BEAM, SAMPLE):
            kw["max_new_tokens"] = 16
    try:  # bad values fail before any work, as one line (exit 2)
        args.kernels = ",".join(decodelab.EngineConfig.from_kwargs(kernels=k).kernels for k in args.kernels.split(","))
    except decodelab.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    cases = set(args.cases.split(","))
    report = {"started": dt.datetime.now().isoformat(timespec="seconds"), "load_start": loadavg(),
              "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                          "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version()},
              "runs": args.runs, "prompt": PROMPT, "cases": []}
    print("bandwidth probe ...", flush=True)
    report["bandwidth"] = bandwidth()
    gemv = report["bandwidth"]["gemv_gbs"]
    probe = GemvProbe()  # rerun in every round of the greedy cases: the fraction of the ceiling uses its own round
    start = time.perf_counter()
    lm = decodelab.load(args.model, dtype="float32", device=args.device)
    report["load_s"] = time.perf_counter() - start
    model, tok = lm.model, lm.tokenizer
    wb = weight_bytes(lm.engine.fast)
    report["model"] = {"name": lm.name, "weight_bytes_f32": wb, "ceiling_tok_s_f32": gemv * 1e9 / wb}
    frac = lambda r: round_fraction(r, "decodelab", wb) or r["decodelab"]["tok_s"]["median"] * wb / (gemv * 1e9)
    print(f"model {lm.name}: {wb / 1e6:.0f} MB of weights per token, ceiling {gemv * 1e9 / wb:.1f} tok/s", flush=True)
    report["kernel_choice"] = {}
    for kernels in args.kernels.split(","):
        klm = lm if kernels == "exact" else lm_on(lm, kernels=kernels)
        suffix = "" if kernels == "exact" else f" kernels={kernels}"
        if klm.engine.fast is not None:
            report["kernel_choice"][kernels] = klm.engine.fast.kernel_summary()
            print(f"kernels={kernels} products measured on {report['machine']['cpu']}: "
                  f"{report['kernel_choice'][kernels]}", flush=True)
        if "greedy" in cases:
            r = case_pair(f"greedy128 float32{suffix}", decodelab_side(klm, PROMPT, **GREEDY),
                          generate_side(model, tok, PROMPT, **GREEDY), args.runs, probe=probe)
            report["cases"].append(r | {"bandwidth_fraction": frac(r), "kernels": kernels})
        if "beam" in cases:
            r = case_pair(f"beam5x64 float32{suffix}", decodelab_side(klm, PROMPT, **BEAM),
                          generate_side(model, tok, PROMPT, **BEAM), args.runs)
            report["cases"].append(r | {"kernels": kernels})
        if "sample" in cases:
            r = case_pair(f"sample8x64 float32{suffix}", decodelab_side(klm, PROMPT, seed=1, **SAMPLE),
                          generate_side(model, tok, PROMPT, seed=1, **SAMPLE), args.runs)
            r["same_ids"] = None  # different RNG streams per row: not comparable token for token
            report["cases"].append(r | {"kernels": kernels})
        if "latency" in cases:
            report["cases"].extend(r | {"kernels": kernels} for r in run_latency(klm, model, tok, args.runs, suffix))
    if "dtypes" in cases:
        ids = tok((HERE / "quality_text.txt").read_text()).input_ids
        report["quality_text_tokens"] = len(ids)
        report["cases"].extend(run_dtypes(lm, args.model, args.runs, gemv, ids, probe))
    if "kernels" in cases:
        import matvec_kernels  # not "kernels": that is the name of Hugging Face's kernels package, which transformers
        # imports (bench/ on sys.path would shadow it)

        print("  kernels ...", flush=True)
        report["kernels"] = matvec_kernels.run(rounds=args.runs)
    if args.compile:
        report["compiled"] = run_compile(lm, args.model, args.runs, probe)
    report["load_end"] = loadavg()
    report["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    out = pathlib.Path(args.out) if args.out else HERE / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
