"""``decodelab sweep``: the command-line face of :func:`decodelab.sweeps.run.sweep` (registered by ``cli.py``)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..cli import Device, Dtype, Json, Kernels, Model, _console, _emit_json, _guarded


@_guarded
def sweep_command(
    prompts: Annotated[str, typer.Argument(help="Prompts: a .jsonl / .txt / .parquet file, or builtin, builtin:en, "
                                           "builtin:pl (315 short story openings with human references).")
                       ] = "builtin",
    strategy: Annotated[Optional[list[str]], typer.Option(
        "--strategy", "-s", help="A preset (greedy, beam5, beam5_rep2, pure, temp0.7, topk40, topp0.95, minp0.1, "
        "typical0.95, rep1.2, norepeat3), the grid 'degeneration' (the default), or NAME:key=value,... with "
        "GenerationConfig names (sampling strategies take seeds as a JSON list). Repeatable.")] = None,
    strategies: Annotated[Optional[str], typer.Option("--strategies", help="A TOML or JSON grid file "
                                                      "(a defaults table and strategy tables).")] = None,
    out: Annotated[str, typer.Option("--out", "-o", help="Output directory; one holding the same sweep is "
                                     "resumed.")] = "sweep-out",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Default length limit per generation "
                                                "(a strategy's own value wins).")] = 64,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Use the first N prompts.")] = None,
    judge_model: Annotated[Optional[str], typer.Option("--judge-model", help="A second model whose perplexity of "
                                                       "the continuations is reported too.")] = None,
    no_references: Annotated[bool, typer.Option("--no-references", help="Leave out the 'reference' row (the "
                                                 "prompts' human continuations, scored like generations).")] = False,
    ray: Annotated[bool, typer.Option("--ray", help="Run on Ray Data (a local cluster unless --ray-address), one "
                                      "actor per model replica. Needs the ray extra of decodelab.")] = False,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="An existing cluster: host:port, "
                                                       "ray://host:port or auto (implies --ray).")] = None,
    ray_actors: Annotated[int, typer.Option("--ray-actors", help="Model replicas (actors).")] = 1,
    ray_actor_cpus: Annotated[Optional[float], typer.Option("--ray-actor-cpus", help="CPUs Ray reserves per actor "
                                                            "(default: min(1, (cluster CPUs - 1) / actors)).")
                              ] = None,
    ray_threads: Annotated[Optional[int], typer.Option("--ray-threads", help="torch threads per actor.")] = None,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", help="Rows per decode step of continuous "
                                                "batching (per replica).")] = 16,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start again in a directory holding another "
                                            "sweep (its rows are deleted).")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars.")] = False,
    model: Model = None,
    json_out: Json = False,
    device: Device = None,
    dtype: Dtype = None,
    kernels: Kernels = None,
) -> None:
    """Run a grid of decoding strategies over a prompt set; report perplexity, Self-BLEU4, Zipf coefficient,
    repetition, distinct-n, length and eos rate per strategy (Holtzman et al. 2019, Table 1).

    Writes OUT/generations.jsonl (every generation with per-token logprobs), OUT/metrics.csv, OUT/metrics.json,
    OUT/report.html (table and plots) and OUT/plots/*.png. A killed sweep resumes where it stopped when run again
    with the same arguments.
    """
    from .report import rich_table
    from .run import sweep

    load_options = {k: v for k, v in {"device": device, "dtype": dtype, "kernels": kernels}.items() if v is not None}
    result = sweep(prompts, strategy or [], strategies_file=strategies, out=out, model=model,
                   judge_model=judge_model, max_new_tokens=max_new_tokens, limit=limit,
                   references=not no_references, ray=ray, ray_address=ray_address, ray_actors=ray_actors,
                   ray_actor_cpus=ray_actor_cpus, ray_threads=ray_threads, max_batch_size=max_batch_size,
                   overwrite=overwrite, progress=not no_progress and not json_out, load_options=load_options)
    if json_out:
        _emit_json({"out": result.out, "rows": result.rows, "new_rows": result.new_rows,
                    "elapsed_s": round(result.elapsed_s, 3), "metrics": result.metrics})
        return
    con = _console()
    con.print(rich_table(result.metrics, title=f"decodelab sweep: {result.rows} rows ({result.new_rows} new) in "
                                               f"{result.elapsed_s:.1f} s"))
    con.print(f"report: {result.out}/report.html")
