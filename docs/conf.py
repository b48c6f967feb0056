"""Sphinx configuration of llmem's reference docs (built by scripts/test.sh with -W: every
warning is an error). Build: python -m sphinx -W -b html docs build/docs"""

import llmem

project = "llmem"
author = "The llmem authors"
copyright = "2026, The llmem authors"
release = version = llmem.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.intersphinx", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
# pages of the repository that are not part of the reference site
exclude_patterns = ["_build", "deviations.md", "kv_cache.md", "reliability.md", "*.png"]
myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_numpy_docstring = True
nitpicky = False
html_theme = "alabaster"
html_static_path: list = []
intersphinx_mapping: dict = {}
# pybind11 docstrings name attributes in `backticks`, which several classes share (n_seq_max)
suppress_warnings = ["myst.header", "ref.python"]
