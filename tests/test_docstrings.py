"""Shared docstring fragments (zinbgrad.docstrings.doc_params) reach help() in full."""

from __future__ import annotations

import pydoc

import zinbgrad.tl as tl
from zinbgrad.docstrings import doc_params


def test_doc_params_fills_whole_line_placeholders_only():
    @doc_params(p="p\n    The p.\nq\n    The q.")
    def f(p, q):
        """Summary with {braces} kept.

        Parameters
        ----------
        {p}
        r
            Default ``f"{kind}"`` untouched.
        """

    assert f.__doc__ == (
        "Summary with {braces} kept.\n\nParameters\n----------\np\n    The p.\nq\n    The q.\n"
        'r\n    Default ``f"{kind}"`` untouched.'
    )


def test_tl_outputs_show_every_parameter():
    for fn in (tl.normalize, tl.residuals, tl.impute, tl.observational_weights):
        text = pydoc.render_doc(fn, renderer=pydoc.plaintext)
        assert "{" + "layer_key}" not in text and "{" + "device_copy}" not in text
        for name in ("adata", "layer", "key", "key_added", "model", "dtype", "device", "copy"):
            assert f"\n    {name}\n" in text, (fn.__name__, name)
        assert "The AnnData copy if ``copy=True``, else ``None``." in text
