"""bench/'s measurement helpers (not the timings themselves): rounds, the per-round bandwidth probe and the
fraction of the ceiling computed from it."""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))

from cases import round_fraction, side_by_side  # noqa: E402
from probes import GemvProbe  # noqa: E402


def test_side_by_side_probes_after_every_round_and_the_fraction_uses_that_round():
    calls: list[str] = []

    def side(name, tokens):
        def run():
            calls.append(name)
            return [[1, 2]], tokens
        return run

    bandwidths = iter([10.0, 20.0, 40.0])

    def probe():
        calls.append("probe")
        return next(bandwidths)

    res = side_by_side({"a": side("a", 4), "b": side("b", 2)}, runs=3, warmup=1, probe=probe)
    # warm-up a, b; then rounds in rotating order, each followed by the probe
    assert calls == ["a", "b", "a", "b", "probe", "b", "a", "probe", "a", "b", "probe"]
    assert res["probe_gbs"] == [10.0, 20.0, 40.0]
    assert len(res["a"]["per_round"]) == 3 and res["same_ids"] is True
    tok_s = res["a"]["per_round"]
    expected = sorted(t * 1e9 / (g * 1e9) for t, g in zip(tok_s, [10.0, 20.0, 40.0]))[1]
    assert round_fraction(res, "a", weight_bytes=10**9) == pytest.approx(expected)


def test_without_a_probe_there_is_no_fraction():
    res = side_by_side({"a": lambda: ([[1]], 1)}, runs=2, warmup=0)
    assert "probe_gbs" not in res and round_fraction(res, "a", 100) is None


def test_gemv_probe_reports_a_plausible_bandwidth():
    probe = GemvProbe(mbytes=8, repeats=2)
    assert probe.weight.numel() * 4 <= 8 * 2**20
    gbs = probe()
    assert 0.1 < gbs < 10_000  # GB/s: a real number, not a unit slip of 1e3 either way


def test_batch_step_bench_rejects_bad_arguments_with_exit_2(capsys):
    import batch_step

    assert batch_step.parse_rows("1,4,16") == [1, 4, 16]
    assert batch_step.main(["--rows", "1,x"]) == 2
    assert batch_step.main(["--rows", "0"]) == 2
    assert batch_step.main(["--kernels", "exact,turbo"]) == 2
    assert "error: invalid --rows='1,x'" in capsys.readouterr().err


def test_request_cpu_bench_rejects_bad_arguments_with_exit_2(capsys):
    import request_cpu

    assert request_cpu.main(["--requests", "0"]) == 2
    assert request_cpu.main(["--tokens", "-1"]) == 2
    assert "error: --requests, --tokens and --rounds must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse: an unknown kernel mode
        request_cpu.main(["--kernels", "turbo"])
    assert exit_info.value.code == 2


def test_matvec_kernel_bench_rejects_bad_arguments_with_exit_2(capsys):
    import matvec_kernels

    assert matvec_kernels.main(["--threads", "0"]) == 2
    assert matvec_kernels.main(["--rounds", "0"]) == 2
    assert matvec_kernels.main(["--rows", "0"]) == 2
    assert capsys.readouterr().err.count("error: --threads, --rounds and --rows must be >= 1") == 3


def test_load_bench_reads_what_the_scheduler_did_between_two_health_readings():
    import load

    before = {"steps": 10, "rows_stepped": 40, "step_s": 1.0, "pass_s": 0.5, "max_rows": 8, "wait_s": 0.25,
              "task_s": 0.5, "joined": 3}
    after = {"steps": 30, "rows_stepped": 280, "step_s": 3.0, "pass_s": 0.75, "max_rows": 16, "wait_s": 1.0,
             "task_s": 2.0, "joined": 10}
    delta = load.scheduler_delta(before, after)
    assert delta == {"steps": 20, "mean_rows": 12.0, "ms_per_step": 100.0, "step_s": 2.0, "pass_s": 0.25,
                     "wait_s": 0.75, "task_s": 1.5, "joined": 7}
    assert load.scheduler_delta(None, None) == {}


def test_matvec_kernel_bench_runs_every_variant():
    """``bench/matvec_kernels.py`` (``bench/run.py``'s ``kernels`` case) runs each of its variants over one layer's
    matrices and the output layer: every variant reports a time (its ``bmm halves`` variant once had no ``weight``
    and failed before timing anything)."""
    from matvec_kernels import run

    from decodelab.fastpath import native

    built = native.library() is not None  # decodelab's own ``panels`` product is a candidate where it is built
    rows = run(rounds=1, layers=1)
    names = [r["kernel"] for r in rows]
    assert "float32 bmm halves" in names and "float32 onednn (fast candidate)" in names
    assert ("float32 panels (fast candidate)" in names) == built and len(names) == 12 + built
    assert all(r["ms_median"] > 0 and r["ms_min"] <= r["ms_median"] and r["rows"] == 1 for r in rows)


def test_matvec_kernel_bench_with_several_rows_runs_the_products_that_take_them():
    """``--rows 16``: only float32 ``F.linear`` and the fast candidates that multiply several rows (not the one-row
    ``halves`` products, not the bfloat16 / quantized variants); GFLOP/s is 2 x rows x weights per pass over the
    median time."""
    from matvec_kernels import SHAPES, run

    from decodelab.fastpath import native

    rows = run(rounds=1, layers=1, rows=16)
    expected = ["float32 F.linear", "float32 weight_first (fast candidate)", "float32 onednn (fast candidate)"]
    if native.library() is not None:
        expected.append("float32 panels (fast candidate)")
    assert [r["kernel"] for r in rows] == expected
    flop = 2 * 16 * (sum(n * k for n, k in SHAPES) + 49152 * 576)
    for r in rows:
        assert r["rows"] == 16 and r["gflop_s"] == pytest.approx(flop / (r["ms_median"] / 1000) / 1e9)
        assert r["tok_s_bound"] == pytest.approx(16 / (r["ms_median"] / 1000))
