"""Griffe extension for the docs build: Sphinx roles in docstrings become cross-references.

The package's docstrings use Sphinx roles (``:class:`~lightning_pbt.plugin.strategy.PopulationStrategy```,
``:func:`space_from_config```); mkdocstrings renders Markdown, where they would show as raw text. This
turns each into an autorefs link (``[`PopulationStrategy`][lightning_pbt.plugin.strategy.PopulationStrategy]``)
when the target is rendered in the API reference, into inline code when it exists but is not rendered
(a private module), and logs a warning (which fails ``mkdocs build --strict``) when it names nothing,
so a renamed function cannot leave a dangling reference in the docs.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(class|func|mod|meth|attr|data|exc|obj):`(~?)([\w.]+?)(\(\))?`")
_log = logging.getLogger("mkdocs.plugins.griffe_sphinx_roles")
# Names the package exports lazily (module __getattr__), which static analysis cannot follow.
_LAZY_TOP_LEVEL = {
    "PopulationBasedTraining": "lightning_pbt.plugin.callback.PopulationBasedTraining",
    "PopulationStrategy": "lightning_pbt.plugin.strategy.PopulationStrategy",
    "PBTReplay": "lightning_pbt.plugin.replay.PBTReplay",
    "PopulationTopology": "lightning_pbt.algorithm.topology.PopulationTopology",
    "member_id_from_env": "lightning_pbt.plugin.strategy.member_id_from_env",
}


def _lookup(pkg: griffe.Module, path: str) -> Any | None:
    if path == pkg.path:
        return pkg
    if not path.startswith(pkg.path + "."):
        return None
    try:
        found = pkg[path[len(pkg.path) + 1 :]]
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None
    if isinstance(found, griffe.Alias):
        try:
            found = found.final_target
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None
    return found


def _is_rendered(obj: Any) -> bool:
    """Whether the API reference has an entry for ``obj``: every step of its path public."""
    node = obj
    while node is not None:
        parent = node.parent
        if node.name.startswith("_"):
            return False
        exported = parent is None or parent.exports is None or node.name in parent.exports
        if not node.is_module and parent is not None and parent.is_module and not exported:
            return False
        if node.is_module and node.path.startswith("lightning_pbt.lightning."):
            return False
        node = parent
    return True


def _resolve(pkg: griffe.Module, owner: Any, target: str) -> Any | None:
    if target.startswith("lightning_pbt."):
        rest = target[len("lightning_pbt.") :]
        candidates = [_LAZY_TOP_LEVEL.get(rest, target)]
    else:
        candidates = []
        scope = owner
        while scope is not None:
            candidates.append(f"{scope.path}.{target}")
            scope = scope.parent
        first = target.split(".")[0]
        if first in _LAZY_TOP_LEVEL:
            candidates.append(_LAZY_TOP_LEVEL[first] + target[len(first) :])
    for candidate in candidates:
        found = _lookup(pkg, candidate)
        if found is not None:
            return found
    return None


class SphinxRoles(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in _walk(pkg):
            if obj.docstring is None:
                continue

            def replace(match: re.Match[str], owner: Any = obj) -> str:
                short, target, call = match.group(2), match.group(3), match.group(4) or ""
                shown = (target.rsplit(".", 1)[-1] if short else target) + call
                found = _resolve(pkg, owner, target)
                if found is None:
                    _log.warning("%s: %s names nothing in the package", owner.path, match.group(0))
                    return f"`{shown}`"
                if not _is_rendered(found):
                    return f"`{shown}`"
                return f"[`{shown}`][{found.path}]"

            obj.docstring.value = _ROLE.sub(replace, obj.docstring.value)

    def on_package_loaded(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """The same hook under its older name (griffe before 1.x); a second pass finds no roles left."""
        self.on_package(pkg=pkg, **kwargs)


def _walk(obj: Any):
    yield obj
    for member in obj.members.values():
        if member.is_alias:
            continue
        yield from _walk(member)
