"""The notebook widget: ``lm.explore(prompt)`` (or ``Explorer(lm, prompt)``) shows the playground's views in a
notebook cell, with the model running in the kernel (no server).

It is an `anywidget <https://anywidget.dev>`_ widget, so it runs in JupyterLab, Notebook 7, VS Code, Colab and marimo
without a build step or a CDN: its JavaScript is the playground's own files (``server/static/i18n.js``,
``views.js``, ``reshape.js``, ``beamtree.js``, read from the installed package and joined unchanged) followed by
``widget.js``, the glue that draws the synced state; its CSS is the playground's ``app.css``. Shown:

- token chips of the text;
- the next-token chart with live temperature / top-k / top-p / min-p (reshaped in the browser by ``reshape.js``,
  from the same logit summary ``/api/next-token`` sends: the model is not run again);
- step mode: clicking a bar appends that token to the text (the kernel then recomputes chips and chart);
- generation (greedy, sampling, beam search) coloured by probability, alternatives on hover, the beam tree, and
  the logit lens heatmap (layers x steps) when "logit lens" is ticked;
- "follow a token": any token's rank and probability at every layer and step of that generation.

Saved and reopened without a kernel (or rendered by nbconvert / GitHub), the output falls back to the static HTML
views of :mod:`decodelab.render_html` (token chips and the next-token table), which the widget puts beside its
view in its output.

Needs the ``anywidget`` package (``pip install anywidget``; the dev extra has it).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from .errors import ConfigError, DecodelabError

try:
    import anywidget
    import traitlets
except ImportError:  # pragma: no cover - exercised only without the optional dependency
    anywidget = None

STATIC_FILES = ("i18n.js", "views.js", "reshape.js", "beamtree.js", "widget.js")
"""The playground's files the widget's JavaScript is made of, in this order (``widget.js`` last: it exports)."""

LOGITS_K = 200
"""Highest logits sent exactly to the chart (the rest as tail bins), as the playground's ``logits_k`` default."""

STRATEGIES = {"greedy": {}, "sampling": {"do_sample": True}, "beam search": {"num_beams": 4, "num_return_sequences": 4}}
"""What the widget's strategy menu passes to ``LM.generate`` (with the chart's temperature / top-k / top-p / min-p
for sampling)."""


def _static(name: str) -> str:
    return resources.files("decodelab.server").joinpath("static", name).read_text(encoding="utf-8")


def widget_esm() -> str:
    """The widget's ES module: the playground's scripts of :data:`STATIC_FILES`, joined unchanged."""
    return "\n".join(f"// ---- decodelab/server/static/{n}\n{_static(n)}" for n in STATIC_FILES)


def widget_css() -> str:
    """The playground's stylesheet plus the few rules of the widget's own layout."""
    return _static("app.css") + """
.dl-widget { font: 14px system-ui, sans-serif; display: grid; gap: 6px; }
.dl-sliders label { margin-right: 12px; }
.dl-error { color: #b00020; margin: 0; }
"""


if anywidget is not None:

    class Explorer(anywidget.AnyWidget):
        """An interactive view of one model in a notebook cell (see the module docstring).

        Args:
            lm: the :class:`~decodelab.lm.LM` to run (in the kernel).
            text: the starting text (step mode appends to it).

        Synced state: ``text``; ``tokens`` (``Tokens.to_dict()``); ``next`` (the logit summary of
        :func:`decodelab.server.reshape.logit_summary`: the :data:`LOGITS_K` highest raw logits and the tail's
        bins); ``settings`` (``temperature``, ``top_k``, ``top_p``, ``min_p``); ``generation``
        (``Generation.to_dict()`` with the trace, plus ``prompt_text``); ``follow`` (see :meth:`follow_token`);
        ``error`` (one line, or empty).

        Raises:
            InputError: ``text`` is not a non-empty valid string (from :meth:`~decodelab.lm.LM.tokenize`).
        """

        _esm = widget_esm()
        _css = widget_css()
        text = traitlets.Unicode("").tag(sync=True)
        tokens = traitlets.Dict({}).tag(sync=True)
        next = traitlets.Dict({}).tag(sync=True)
        settings = traitlets.Dict({"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}).tag(sync=True)
        generation = traitlets.Dict({}).tag(sync=True)
        error = traitlets.Unicode("").tag(sync=True)
        follow = traitlets.Dict({}).tag(sync=True)

        def __init__(self, lm, text: str, **kwargs: Any) -> None:
            lm.tokenize(text)  # a bad text fails here, before the widget exists
            super().__init__(**kwargs)
            self._lm = lm
            self._generation = None
            self.observe(self._on_text, names="text")
            self.on_msg(self._on_msg)
            self.text = text

        # --- kernel side of the user's actions -------------------------------------------------------------------
        def _on_text(self, change: dict) -> None:
            """Text changed (set here or by a bar click): recompute the chips and the next-token summary."""
            from .server.reshape import logit_summary

            try:
                self.tokens = self._lm.tokenize(change["new"]).to_dict()
                _, last = self._lm.next_logits(change["new"])
                self.next = logit_summary(last, LOGITS_K, self._lm.tokenizer)
                self.error = ""
            except DecodelabError as err:
                self.error = str(err)

        def _on_msg(self, _widget, content: dict, _buffers) -> None:
            if isinstance(content, dict) and content.get("type") == "generate":
                self.run_generation(content.get("strategy", "greedy"), content.get("max_new_tokens", 12),
                                    bool(content.get("lens")))
            elif isinstance(content, dict) and content.get("type") == "follow":
                self.follow_token(content.get("token", ""))

        def run_generation(self, strategy: str = "greedy", max_new_tokens: int = 12, lens: bool = False) -> None:
            """Generate from the current text (what the Generate button does) and show it: ``strategy`` one of
            :data:`STRATEGIES`; sampling uses the chart's settings. A bad setting is shown in ``error``, not raised.
            """
            if strategy not in STRATEGIES:
                self.error = str(ConfigError(f"invalid strategy={strategy!r}: expected one of {', '.join(STRATEGIES)}"))
                return
            kwargs = dict(STRATEGIES[strategy], max_new_tokens=max_new_tokens, trace=True, lens=bool(lens))
            if strategy == "sampling":
                s = self.settings
                kwargs.update(temperature=s.get("temperature"), top_k=s.get("top_k"), top_p=s.get("top_p"),
                              min_p=s.get("min_p") or None)
            try:
                g = self._lm.generate(self.text, **kwargs)
            except DecodelabError as err:
                self.error = str(err)
                return
            self._generation = g
            self.generation = {**g.to_dict(), "prompt_text": self.text}
            self.follow = {}
            self.error = ""

        def follow_token(self, token: int | str) -> None:
            """Follow ``token`` (an id or a one-token text) through every layer and step of the last generation's
            first sequence (:func:`decodelab.lens.follow_token`): sets ``follow`` to ``{"token", "steps" (the
            chosen tokens), "grid": [step][layer] -> [rank (0-based), prob in [0, 1]]}``. Errors (no generation
            yet, not one token) are shown in ``error``, not raised."""
            from .lens import follow_token

            if self._generation is None:
                self.error = "generate first: a token is followed through the layers of a generation"
                return
            try:
                grid = follow_token(self._lm, self._generation, token)
            except DecodelabError as err:
                self.error = str(err)
                return
            seq = self._generation.sequences[0]
            steps = [self._lm.tokenizer.decode([i]) for i in seq.new_ids]
            self.follow = {"token": token, "steps": steps, "grid": [[list(c) for c in row] for row in grid]}
            self.error = ""

        def _repr_mimebundle_(self, **kwargs: Any):
            """The widget view plus a static HTML fallback (chips and the next-token table) that still shows after
            the notebook is saved and reopened without a kernel, or rendered by nbconvert / GitHub."""
            bundle = super()._repr_mimebundle_(**kwargs)
            data = bundle[0] if isinstance(bundle, tuple) else bundle
            try:
                data["text/html"] = (self._lm.tokenize(self.text)._repr_html_()
                                     + self._lm.next_token(self.text, top_k=10)._repr_html_())
            except DecodelabError:
                pass
            return bundle


def explore(lm, text: str):
    """The :class:`Explorer` widget for ``lm`` starting at ``text`` (``lm.explore(text)``).

    Raises:
        ConfigError: the ``anywidget`` package is not installed (``pip install anywidget``).
        InputError: a bad ``text``.
    """
    if anywidget is None:
        raise ConfigError("invalid widget: the notebook widget needs the anywidget package (pip install anywidget)",
                          param="widget")
    return Explorer(lm, text)
