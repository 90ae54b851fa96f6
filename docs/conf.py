"""Sphinx configuration of the zinbgrad documentation.

Build: ``pip install -e ".[docs]" && sphinx-build -W -b html docs docs/_build/html``.
The API pages are generated from each public module's ``__all__`` (``write_api_pages``), so
new public functions appear without editing the docs. Tutorials are MyST notebooks executed
at build time: by default only those listed in ``docs/tutorials/ci.txt`` (the CI build);
``ZINBGRAD_DOCS_EXECUTE=all`` runs every one (``docs/build.sh``), ``=off`` none.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # docs/_ext helpers

import zinbgrad  # noqa: E402

project = "zinbgrad"
author = "zinbgrad developers"
copyright = f"{date.today().year}, {author}"
version = release = zinbgrad.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx-mathjax-offline",  # MathJax served with the site (no CDN)
    "sphinx.ext.mathjax",
    "sphinxarg.ext",
    "sphinx_copybutton",
    "sphinx_design",
    "myst_nb",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "jupyter_execute"]
templates_path = ["_templates"]
html_static_path = ["_static"]
html_css_files = ["custom.css"]

# -- API reference: generated from __all__ ---------------------------------------------------
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": True, "inherited-members": False, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
# one parameter per line once a signature is longer than this
python_maximum_signature_line_length = 88
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False
napoleon_use_param = False  # keeps "a, b, c" parameter groups together
napoleon_use_ivar = True
napoleon_custom_sections = [("Attributes", "params_style")]

#: module -> (page title, intro); each page lists ``module.__all__`` with autosummary
API_MODULES = {
    "zinbgrad": (
        "The estimator",
        "The scikit-learn style estimator. Import as ``import zinbgrad``.",
    ),
    "zinbgrad.tl": (
        "Tools: ``zinbgrad.tl``",
        "Scanpy-style functions: they take an AnnData, write their results into it "
        "(``key_added=``) and never modify ``.X``; ``copy=True`` returns a modified copy.",
    ),
    "zinbgrad.pl": (
        "Plots: ``zinbgrad.pl``",
        "Matplotlib plots in scanpy style (``show=``, ``save=``; they return the axes): the "
        "objective history, the embedding with its uncertainty, the choice of K, the loadings.",
    ),
    "zinbgrad.pp": (
        "Preprocessing: ``zinbgrad.pp``",
        "Gene selection in scanpy's style: the scVI benchmarks' top-variance genes.",
    ),
    "zinbgrad.persistence": (
        "Model files: ``zinbgrad.persistence``",
        "A fitted model's state (one list of fitted attributes) to and from a ``.npz`` model "
        "file or an AnnData; :meth:`zinbgrad.ZINBWaVE.save`, :meth:`~zinbgrad.ZINBWaVE.load` "
        "and :func:`zinbgrad.tl.model_from_anndata` are the usual entry points.",
    ),
    "zinbgrad.datasets": (
        "Data sets: ``zinbgrad.datasets``",
        "Small data sets shipped inside the package (nothing is downloaded), and readers of "
        "the original files of the benchmark data sets (Zeisel text, loom, 10x HDF5).",
    ),
    "zinbgrad.simulate": (
        "Simulation: ``zinbgrad.simulate``",
        "Counts drawn from a fitted model (zinbwave's ``zinbSim``) and large synthetic data "
        "sets streamed to ``.h5ad``.",
    ),
    "zinbgrad.metrics": (
        "Metrics: ``zinbgrad.metrics``",
        "Clustering, batch-mixing and imputation metrics used by the benchmarks.",
    ),
    "zinbgrad.de": (
        "Differential expression internals: ``zinbgrad.de``",
        "zinbwave's weighted edgeR pipeline (``glmWeightedF``) in Python; "
        ":func:`zinbgrad.tl.differential_expression` is the AnnData entry point.",
    ),
}


def public_names(modname: str) -> list[str]:
    """The documented names of a module: its ``__all__`` less submodules and dunders."""
    mod = importlib.import_module(modname)
    names = getattr(mod, "__all__", None)
    if names is None:
        raise RuntimeError(f"{modname} has no __all__: the API reference is generated from it")
    out = []
    for name in names:
        if name.startswith("_"):
            continue
        obj = getattr(mod, name)
        if type(obj).__name__ == "module":
            continue
        out.append(name)
    return out


def write_api_pages(app, config) -> None:
    """Write ``api/<module>.rst`` from ``__all__`` (only when the text changes). An object
    exported by several modules (``zinbgrad.tl.differential_expression`` is
    ``zinbgrad.de.differential_expression``) is documented once, under the first."""
    outdir = HERE / "api"
    outdir.mkdir(exist_ok=True)
    seen: dict[int, str] = {}
    for modname, (title, intro) in API_MODULES.items():
        mod = importlib.import_module(modname)
        names, also = [], []
        for n in public_names(modname):
            obj = getattr(mod, n)
            if id(obj) in seen:
                also.append(f":obj:`{seen[id(obj)]}`")
            else:
                seen[id(obj)] = f"{modname}.{n}"
                names.append(n)
        if also:
            intro += " Also exported here: " + ", ".join(also) + "."
        lines = [
            f".. This page is generated by docs/conf.py from {modname}.__all__; do not edit.",
            "",
            title,
            "=" * len(title),
            "",
            f".. module:: {modname}",
            "   :no-index:" if modname == "zinbgrad" else "",
            "",
            intro,
            "",
            f".. currentmodule:: {modname}",
            "",
            ".. autosummary::",
            "   :toctree: generated",
            "   :nosignatures:",
            "",
        ]
        lines += [f"   {n}" for n in names]
        text = "\n".join(lines) + "\n"
        path = outdir / f"{modname}.rst"
        if not path.exists() or path.read_text() != text:
            path.write_text(text)


# -- Notebooks (myst-nb) ---------------------------------------------------------------------
_EXECUTE = os.environ.get("ZINBGRAD_DOCS_EXECUTE", "ci")
if _EXECUTE not in ("ci", "all", "off"):
    raise ValueError(f"ZINBGRAD_DOCS_EXECUTE must be ci, all or off, got {_EXECUTE!r}")
_ALL_TUTORIALS = sorted(p.stem for p in (HERE / "tutorials").glob("[0-9]*.md"))
_CI_TUTORIALS = [
    ln.strip()
    for ln in (HERE / "tutorials" / "ci.txt").read_text().splitlines()
    if ln.strip() and not ln.startswith("#")
]
nb_execution_mode = "off" if _EXECUTE == "off" else "cache"
nb_execution_cache_path = str(HERE / "_build" / ".jupyter_cache")
nb_execution_excludepatterns = (
    []
    if _EXECUTE == "all"
    else [f"tutorials/{t}.md" for t in _ALL_TUTORIALS if t not in _CI_TUTORIALS]
)
nb_execution_timeout = 300
nb_execution_raise_on_error = True
nb_execution_show_tb = True
# Every notebook runs in a kernel of the Python that builds the docs (its venv), whatever
# kernels are installed elsewhere: a kernelspec written under _build, first on JUPYTER_PATH.
_KERNEL = "zinbgrad-docs"
_kernel_dir = HERE / "_build" / "jupyter" / "kernels" / _KERNEL
_kernel_dir.mkdir(parents=True, exist_ok=True)
(_kernel_dir / "kernel.json").write_text(
    json.dumps(
        {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (zinbgrad docs)",
            "language": "python",
        }
    )
)
os.environ["JUPYTER_PATH"] = os.pathsep.join(
    [str(HERE / "_build" / "jupyter")] + [p for p in [os.environ.get("JUPYTER_PATH")] if p]
)
nb_kernel_rgx_aliases = {".*": _KERNEL}
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# -- HTML ------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"zinbgrad {release}"
html_context = {"default_mode": "light"}
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "home_page_in_toc": True,
    "use_download_button": False,
    "use_fullscreen_button": False,
}
html_show_sourcelink = False
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True


def skip_member(app, what, name, obj, skip, options):
    """Hide scikit-learn's generated metadata-routing methods (``set_fit_request``, ...)."""
    if re.fullmatch(r"set_\w+_request", name):
        return True
    return None


def viewcode_follow_imported(app, modname, attribute):
    """No [source] link for an object documented under a module other than its own public
    one (``zinbgrad.tl.differential_expression`` from ``zinbgrad.de``): viewcode would link
    the source back to an anchor that does not exist."""
    obj = getattr(importlib.import_module(modname), attribute, None)
    real = getattr(obj, "__module__", None)
    if real != modname and real in API_MODULES:
        return modname
    return None


def setup(app):
    app.connect("autodoc-skip-member", skip_member)
    app.connect("viewcode-follow-imported", viewcode_follow_imported)
    # config-inited: before Sphinx lists the source files (and autosummary reads them)
    app.connect("config-inited", write_api_pages)
