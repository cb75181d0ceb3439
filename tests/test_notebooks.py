"""The walk-through notebooks (``examples/walkthrough.ipynb``, English, and ``examples/walkthrough.pl.ipynb``,
Polish) run top to bottom in a fresh kernel with nbclient, and say what the notebook's path says they should: the
prompt's ids, the logits' shape, the argmax " night", five returned beams, the beam tree, a seeded sampling run, the
sweep's table. The checks read the cells' printed output (what a reader sees) and, through one extra cell appended in
memory, the kernel's variables.

The kernel inherits the session's environment (conftest: ``HF_HUB_OFFLINE=1``, the session's decodelab cache, which
the ``embedded`` fixture has filled, so the kernel's load is a read of the safetensors cache). The Qwen2-0.5B cell
runs only when that model is in the Hugging Face cache; otherwise it must say it was skipped.
"""

from __future__ import annotations

import json
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

pytestmark = pytest.mark.slow

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
SMOL_IDS = [1589, 436, 253, 3605, 284, 43471]  # "It was a dark and stormy" in SmolLM2's vocabulary
CHECK = """import json
print("CHECK" + json.dumps({
    "ids": tokens.ids, "shape": dist.logits_shape, "argmax": [dist.argmax.id, dist.argmax.token],
    "top": [c.token for c in dist.top], "probs": [c.prob for c in dist.top],
    "greedy_new": greedy.sequences[0].new_ids, "beam_text": beam.sequences[0].text,
    "beams": [[s.new_ids, s.score] for s in beams.sequences], "statuses": sorted({n.status for n in beams.trace.beam_nodes}),
    "samples": [s.new_ids for s in samples.sequences],
    "sweep": [[r["strategy"], r["rows"]] for r in result.metrics],
    "lens": [[s.id, len(s.layers), s.layers[-1].prob, s.layers[-1].rank] for s in looked.trace.lens],
    "night_first_top": first_top, "night_last": night[0][-1],
    "qwen_cached": qwen_snapshot is not None,
}))"""


def _text(cell) -> str:
    """Everything a code cell printed (stdout) or displayed as text/plain."""
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream" and out.get("name") == "stdout":
            parts.append(out["text"])
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def _tagged(nb, tag: str):
    (cell,) = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    return cell


@pytest.fixture(scope="module")
def greedy_ids(embedded):
    """The embedded model's 8 greedy new ids in this process: what the notebooks' greedy cell must show. Run before
    the kernels start, it also leaves the session cache's kernel choice (fastpath/kernel_choice.py) measured."""
    from decodelab.lm import LM

    lm = LM(embedded.model, embedded.tokenizer, embedded.name)
    return lm.generate("It was a dark and stormy", max_new_tokens=8).sequences[0].new_ids


@pytest.mark.parametrize("name", ["walkthrough.ipynb", "walkthrough.pl.ipynb"])
def test_walkthrough_notebook_executes_with_the_expected_outputs(name, greedy_ids, tmp_path):
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(CHECK))
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors

    state = json.loads(_text(nb.cells[-1]).split("CHECK", 1)[1])
    # what the reader sees, cell by cell
    assert str(SMOL_IDS) in _text(_tagged(nb, "ids"))
    assert "[1, 6, 49152]" in _text(_tagged(nb, "shape"))
    assert _text(_tagged(nb, "argmax")).strip() == "3163 ' night'"
    top10 = _text(_tagged(nb, "top10")).splitlines()
    assert top10[0].startswith("' night'") and "97.07%" in top10[0]
    assert len([line for line in top10 if "p = " in line]) == 10
    assert "[3163, " in _text(_tagged(nb, "greedy"))
    assert len(_text(_tagged(nb, "beams")).strip().splitlines()) == 5
    tree = _text(_tagged(nb, "tree"))
    assert "returned" in tree and "pruned" in tree and "★" in tree
    assert "greedy" in _text(_tagged(nb, "sweep")) and "topk40" in _text(_tagged(nb, "sweep"))
    shown = [o["data"] for o in _tagged(nb, "widget").outputs if "data" in o]
    assert any("application/vnd.jupyter.widget-view+json" in d and "1589" in d.get("text/html", "") for d in shown)
    if not state["qwen_cached"]:
        assert "skipped" in _text(_tagged(nb, "qwen")) or "pominięte" in _text(_tagged(nb, "qwen"))

    # the kernel's values equal the API's in this process
    assert state["ids"] == SMOL_IDS and state["shape"] == [1, 6, 49152]
    assert state["argmax"] == [3163, " night"]
    assert state["top"][:3] == [" night", " evening", " day"]
    assert state["probs"][0] == pytest.approx(0.9707, abs=1e-4) and state["probs"] == sorted(state["probs"], reverse=True)
    assert state["greedy_new"] == greedy_ids
    assert state["greedy_new"][0] == 3163
    assert len(state["beams"]) == 5
    scores = [s for _, s in state["beams"]]
    assert scores == sorted(scores, reverse=True) and len({tuple(i) for i, _ in state["beams"]}) == 5
    assert {"kept", "pruned", "returned"} <= set(state["statuses"])
    assert len(state["samples"]) == 2 and all(len(s) <= 8 for s in state["samples"])
    assert state["sweep"] == [["greedy", 2], ["topk40", 2]]
    # the logit lens: 30 layers per step, the last one the model's own distribution (' night' at 97.07 %, rank 0)
    assert [s[0] for s in state["lens"]] == greedy_ids[:3] and all(s[1] == 30 for s in state["lens"])
    assert state["lens"][0][2] == pytest.approx(state["probs"][0], abs=1e-5) and all(s[3] == 0 for s in state["lens"])
    assert state["night_last"][0] == 0 and state["night_last"][1] == pytest.approx(state["probs"][0], abs=1e-5)
    assert 15 <= state["night_first_top"] < 30  # ' night' surfaces only in the upper layers (24 on x86 CPUs)
    assert "logit lens" in _text(_tagged(nb, "lens")) and "layer 29" in _text(_tagged(nb, "lens"))
