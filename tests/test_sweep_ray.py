"""``decodelab sweep --ray``: a local Ray cluster on this machine (2 CPUs; each actor reserves 0.5 CPU so Ray Data's
own tasks can still run) gives exactly the rows and metrics of the local run, for greedy, beam and seeded sampling.

The tiny random Llama is saved to a directory that both the local run and every actor load (``decodelab.load``)."""

from __future__ import annotations

import json

import pytest

import decodelab

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

STRATS = ["greedy", "b2:num_beams=2,repetition_penalty=1.5",
          "nuc:do_sample=true,top_p=0.9,top_k=0,seeds=[0,1]", "mp:do_sample=true,min_p=0.1,top_k=0,seed=5"]


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama.model.save_pretrained(path)
    tiny_llama.tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def local_cluster():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _rows(path) -> dict:
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    return {(r["strategy"], r["seed"], r["prompt_id"], r["sample"]): r for r in rows}


def test_ray_rows_and_metrics_equal_local(tiny_dir, local_cluster, tmp_path):
    common = dict(model=tiny_dir, max_new_tokens=6, limit=4)
    local = decodelab.sweep("builtin", STRATS, out=tmp_path / "local", **common)
    on_ray = decodelab.sweep("builtin", STRATS, out=tmp_path / "ray", ray=True, ray_actors=2, **common)
    assert ray.is_initialized()  # a cluster the caller started is left running
    a, b = _rows(tmp_path / "local" / "generations.jsonl"), _rows(tmp_path / "ray" / "generations.jsonl")
    assert len(a) == 4 * (1 + 1 + 2 + 1) + 4
    assert a == b
    assert on_ray.metrics == local.metrics
    facts = json.loads((tmp_path / "ray" / "metrics.json").read_text())
    assert facts["execution"]["mode"] == "ray" and facts["execution"]["actors"] == 2
