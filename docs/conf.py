"""Sphinx configuration of the jaxbnb documentation (`make docs`: offline, warnings are errors).

The guide is Markdown (MyST); the API reference is generated from the docstrings (autodoc,
Google-style sections through napoleon).
"""

import importlib.util
import inspect
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.abspath(".."))  # document this checkout's jaxbnb, installed or not
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # importing jaxbnb for autodoc needs no accelerator

project = "jaxbnb"
author = "jaxbnb contributors"
copyright = "jaxbnb contributors"  # noqa: A001 - Sphinx's name for it

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3

autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"  # no empty entries for undocumented args
autodoc_inherit_docstrings = False  # no Flax or optax base-class text (e.g. Linen `setup`)

html_theme = "furo" if importlib.util.find_spec("furo") else "alabaster"
html_title = "jaxbnb"


def _skip_field_defaults(app, what, name, obj, skip, options):
  """Skip class attributes that are dataclass field defaults from outside jaxbnb: a dtype class
  (``jnp.float32``) or an initializer function (``nn.initializers.zeros``). autodoc would
  document them as aliases of numpy's types or as methods, next to the field's own entry from
  the class docstring's Attributes section."""
  if what != "class":
    return None
  is_dtype = isinstance(obj, type) and (issubclass(obj, np.generic)  # np.float32
                                        or isinstance(getattr(obj, "dtype", None), np.dtype))
  foreign_fn = inspect.isfunction(obj) and not obj.__module__.startswith("jaxbnb")
  return True if is_dtype or foreign_fn else None


_REPRS = [  # default values in signatures, as a reader would write them
    (re.compile(r"<class 'jax\.numpy\.(\w+)'>"), r"jnp.\1"),
    (re.compile(r"<class 'numpy\.(\w+)'>"), r"np.\1"),
    (re.compile(r"<function (\w+)\.<locals>\.\w+(?: at 0x[0-9a-f]+)?>"), r"\1(...)"),
    (re.compile(r"<function (\w+)(?: at 0x[0-9a-f]+)?>"), r"\1"),
    (re.compile(r", parent=<flax\.linen\.module\._Sentinel object>, name=None"), ""),
]


def _clean_signature(app, what, name, obj, options, signature, return_annotation):
  """Readable signatures: NNX modules show their ``__init__`` arguments instead of the
  metaclass's ``(*args, **kwargs)``; default values print as code (``jnp.float32``); Linen's
  ``parent``/``name`` fields are left out."""
  if what == "class" and signature == "(*args, **kwargs)":
    try:
      init = inspect.signature(obj.__init__)
    except (TypeError, ValueError):
      init = None
    params = list(init.parameters.values())[1:] if init else []  # without self
    generic = [inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD]
    if params and [p.kind for p in params] != generic:
      params = [p.replace(annotation=p.empty) for p in params]  # types go in the description
      signature = str(init.replace(parameters=params, return_annotation=inspect.Signature.empty))
  if signature:
    for pattern, repl in _REPRS:
      signature = pattern.sub(repl, signature)
  return signature, return_annotation


def setup(app):
  app.connect("autodoc-skip-member", _skip_field_defaults)
  app.connect("autodoc-process-signature", _clean_signature)
