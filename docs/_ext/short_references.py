"""Python cross-references by unambiguous short name.

A docstring refers to an object of another module by its short name (``:class:`Smoothness```
in a module that imports it, ``:data:`smoothness.MARGIN```); Sphinx looks such a name up only
in the current module and class. Where it finds nothing, this looks for the one documented
object whose full name ends with ``.`` + the name (what a leading ``.`` asks Sphinx to do).
No match, or several, leaves the reference unresolved, and the build fails on it.
"""

from __future__ import annotations

from docutils import nodes
from sphinx.addnodes import pending_xref
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment


def _resolve(
    app: Sphinx, env: BuildEnvironment, node: pending_xref, contnode: nodes.Element
) -> nodes.Element | None:
    if node.get("refdomain") != "py" or node.get("refspecific"):
        return None
    target = node["reftarget"]
    domain = env.domains.python_domain
    suffix = "." + target
    matches = [name for name in domain.objects if name.endswith(suffix)]
    if len(matches) != 1:
        return None
    node["reftarget"], node["refspecific"] = matches[0], False
    return domain.resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], matches[0], node, contnode
    )


def setup(app: Sphinx) -> dict:
    app.connect("missing-reference", _resolve)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
