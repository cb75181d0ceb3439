"""``make bench-peers``: llama.cpp (through llama-cpp-python) on the same weights, for comparison with bench/run.py.

The embedded model ships as ``SmolLM2-135M-Instruct.Q4_1.gguf``; decodelab's float32 weights are that file
dequantized. This script requantizes the same file with ``llama_model_quantize`` (``allow_requantize``) to F32,
BF16 and Q8_0, so every llama.cpp figure is on the very weights decodelab runs, then times greedy decoding of 128
tokens (``--runs`` times, median) with ``n_threads`` threads. ``--interleave`` alternates every llama.cpp run with
one of decodelab's closest compiled engine (float32 / bfloat16 ``kernels="fast"``, int8, int4) in the same process. llama-cpp-python builds llama.cpp from source (minutes):
``make bench-peers`` installs it; CI never does. Results go to ``bench/results/peers-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import pathlib
import statistics
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from probes import loadavg  # noqa: E402

PROMPT = "It was a dark and stormy night, and the old lighthouse keeper"
FTYPES = {"f32": 0, "bf16": 32, "q8_0": 7, "q4_1": 3}  # llama_ftype values (llama.h)


def requantize(llama_cpp, src: pathlib.Path, dst: pathlib.Path, ftype: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc}) for ftype {ftype}")


def time_greedy(llama_cpp, path: pathlib.Path, threads: int, runs: int, tokens: int) -> dict:
    llm = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_ctx=512, verbose=False, seed=0)
    llm(PROMPT, max_tokens=4, temperature=0.0, top_k=1)  # warm-up
    speeds, loads = [], []
    for _ in range(runs):
        loads.append(loadavg()[0])
        start = time.perf_counter()
        out = llm(PROMPT, max_tokens=tokens, temperature=0.0, top_k=1)
        seconds = time.perf_counter() - start
        speeds.append(out["usage"]["completion_tokens"] / seconds)
    return {"tok_s_median": statistics.median(speeds), "tok_s_min": min(speeds), "tok_s_max": max(speeds),
            "load": loads}


DECODELAB_VARIANTS = {  # llama.cpp type -> decodelab.load() options of the closest decodelab engine
    "f32": dict(kernels="fast", compile=True),
    "bf16": dict(dtype="bfloat16", kernels="fast", compile=True),
    "q8_0": dict(quantize="int8", quantize_lm_head=True, compile=True),  # Q8_0 quantizes the output layer too
    "q4_1": dict(quantize="int4", quantize_lm_head=True, compile=True),  # the embedded Q4_1 file's output is Q8_0
}


def time_interleaved(llama_cpp, path: pathlib.Path, name: str, threads: int, runs: int, tokens: int) -> dict:
    """llama.cpp and decodelab's closest compiled engine (:data:`DECODELAB_VARIANTS`) in one process, one run of
    each in turn (``runs`` rounds after a warm-up of each), greedy ``tokens`` tokens after the same prompt."""
    import decodelab
    import torch

    torch.set_num_threads(threads)
    llm = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_ctx=512, verbose=False, seed=0)
    lm = decodelab.load(**DECODELAB_VARIANTS[name])
    sides = {
        "llama.cpp": lambda: llm(PROMPT, max_tokens=tokens, temperature=0.0, top_k=1)["usage"]["completion_tokens"],
        "decodelab": lambda: len(lm.generate(PROMPT, max_new_tokens=tokens, ignore_eos=True).sequences[0].new_ids),
    }
    for fn in sides.values():
        fn()  # warm-up (decodelab: compiles or loads its package)
    speeds: dict[str, list[float]] = {k: [] for k in sides}
    loads = []
    for r in range(runs):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for key in order:
            loads.append(loadavg()[0])
            start = time.perf_counter()
            n = sides[key]()
            speeds[key].append(n / (time.perf_counter() - start))
    out = {key: {"tok_s_median": statistics.median(v), "tok_s_min": min(v), "tok_s_max": max(v)}
           for key, v in speeds.items()}
    out["decodelab_options"] = {k: v for k, v in DECODELAB_VARIANTS[name].items()}
    out["ratio"] = out["decodelab"]["tok_s_median"] / out["llama.cpp"]["tok_s_median"]
    out["load"] = loads
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--types", default=",".join(FTYPES), help="llama.cpp weight types to run (comma-separated)")
    ap.add_argument("--interleave", action="store_true",
                    help="alternate each llama.cpp run with decodelab's closest compiled engine in this process")
    args = ap.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: `make bench-peers` installs it (builds llama.cpp, minutes)")
        return 1
    from decodelab.models import embedded_gguf_path

    src = embedded_gguf_path()
    report = {"llama_cpp_python": getattr(llama_cpp, "__version__", "?"), "threads": args.threads, "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, ftype in FTYPES.items():
            if name not in args.types.split(","):
                continue
            path = src if name == "q4_1" else pathlib.Path(tmp) / f"model-{name}.gguf"
            if name != "q4_1":
                requantize(llama_cpp, src, path, ftype)
            if args.interleave:
                res = time_interleaved(llama_cpp, path, name, args.threads, args.runs, args.tokens)
                report["results"][name] = res
                lc, dl = res["llama.cpp"], res["decodelab"]
                print(f"{name:5s} llama.cpp {lc['tok_s_median']:6.1f} tok/s ({lc['tok_s_min']:.1f}-"
                      f"{lc['tok_s_max']:.1f})  decodelab {dl['tok_s_median']:6.1f} ({dl['tok_s_min']:.1f}-"
                      f"{dl['tok_s_max']:.1f})  ratio {res['ratio']:.2f}", flush=True)
                continue
            res = time_greedy(llama_cpp, path, args.threads, args.runs, args.tokens)
            report["results"][name] = res
            print(f"llama.cpp {name:5s} {res['tok_s_median']:6.1f} tok/s "
                  f"({res['tok_s_min']:.1f}-{res['tok_s_max']:.1f})", flush=True)
    out = HERE / "results" / f"peers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
