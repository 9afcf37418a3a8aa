"""The documentation site keeps working: it builds strictly, documents every public name, and its
examples still run.

- The site is built once per session, as ``make docs`` builds it (``mkdocs build --strict``), into a
  temporary folder: a broken link, a page left out of the navigation or a reference to a name that no
  longer exists fails the build.
- Every module of the package has a reference page, and every name in a public module's ``__all__``
  (and in ``lightning_pbt.__all__``) has an entry in it.
- Fenced Python blocks in the docs and the README all compile; a block preceded by
  ``<!-- docs-test: run -->`` is a complete program and is run, one preceded by
  ``<!-- docs-test: import -->`` is run without its ``if __name__ == "__main__":`` part (it would start
  processes), and one preceded by ``<!-- docs-test: excerpt PATH -->`` must be an excerpt of that file.
- The Hydra command lines of the docs compose, validate and build the callback and strategy as
  ``examples/digits.py`` does, and an error shown after a ``$ python examples/digits.py`` line is the
  error that command gives.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_pbt

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
MARKDOWN = [*PAGES, REPO / "README.md"]
FENCE = re.compile(
    r"(?:<!-- docs-test: (?P<mode>[\w-]+)(?: (?P<arg>\S+))? -->\n)?```(?P<lang>\w*)[^\n]*\n(?P<body>.*?)```", re.S
)
# Modules that are not part of the reference: private ones, the flavour package, which re-exports the
# glue modules' names (its page documents it as a whole), and the packages that keep public paths of the
# flat layout (``lightning_pbt.space``, ``python -m lightning_pbt.report`` / ``.internals``).
NOT_IN_REFERENCE = {"lightning", "space", "results", "report", "internals"}


def blocks(lang: str) -> list[tuple[str, str | None, str | None, str]]:
    """``(where, mode, arg, body)`` of every fenced block in ``lang`` of the docs and the README."""
    found = []
    for path in MARKDOWN:
        text = path.read_text()
        for match in FENCE.finditer(text):
            if match["lang"] == lang:
                line = text[: match.start("body")].count("\n") + 1
                found.append((f"{path.relative_to(REPO)}:{line}", match["mode"], match["arg"], match["body"]))
    return found


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def public_modules() -> list[str]:
    """Every module and subpackage of lightning_pbt with a reference page, as ``layer.module`` paths."""
    found = []
    for info in pkgutil.walk_packages(lightning_pbt.__path__, "lightning_pbt."):
        parts = info.name.split(".")[1:]
        if parts[0] not in NOT_IN_REFERENCE and not any(part.startswith("_") for part in parts):
            found.append(".".join(parts))
    return sorted(found)


def page_of(module: str) -> str:
    """The reference page of ``layer.module`` in the built site: docs/reference/<layer>/<module>.md."""
    return "/".join(module.split(".")) + "/index.html"


def test_site_builds_strictly_and_renders_no_raw_sphinx_role(site: Path):
    assert len(list(site.rglob("*.html"))) > 30
    for page in (site / "reference").rglob("*.html"):
        text = page.read_text()
        # Markdown turns the role's backticks into <code>, so look for both forms.
        raw = re.search(r":(class|func|mod|meth|attr|data|exc|obj):(`|<code>)", text)
        assert not raw, f"{page}: a Sphinx role was not converted: {raw and text[raw.start() : raw.start() + 80]}"
    # The roles became links: ":func:`lightning_pbt.algorithm.space_config.space_from_config`" in the callback's
    # docstring.
    callback = (site / "reference" / page_of("plugin.callback")).read_text()
    assert 'href="../../algorithm/space_config/#lightning_pbt.algorithm.space_config.space_from_config"' in callback


@pytest.mark.parametrize("module", public_modules())
def test_every_public_name_has_a_reference_entry(site: Path, module: str):
    page = site / "reference" / page_of(module)
    assert page.exists(), f"lightning_pbt.{module} has no page under docs/reference/ (add it and to mkdocs.yml)"
    html = page.read_text()
    names = importlib.import_module(f"lightning_pbt.{module}").__all__
    missing = [name for name in names if f'id="lightning_pbt.{module}.{name}"' not in html]
    assert not missing, f"lightning_pbt.{module}: no reference entry for {missing}"


def test_every_top_level_name_is_documented_where_it_is_defined(site: Path):
    for name in lightning_pbt.__all__:
        module = getattr(lightning_pbt, name).__module__
        page = site / "reference" / page_of(module.split(".", 1)[1])
        assert f'id="{module}.{name}"' in page.read_text(), f"lightning_pbt.{name}: no entry in {page}"
        assert f"{module}.{name}" in (site / "reference" / "index.html").read_text(), f"{name} not in the index"


def test_every_python_block_compiles():
    found = blocks("python")
    assert len(found) >= 5
    for where, _, _, body in found:
        compile(body, where, "exec")


def program_blocks(mode: str) -> list[tuple[str, str]]:
    return [(where, body) for where, found_mode, _, body in blocks("python") if found_mode == mode]


@pytest.mark.parametrize(("where", "body"), program_blocks("run"), ids=[w for w, _ in program_blocks("run")])
def test_complete_programs_run(where: str, body: str):
    exec(compile(body, where, "exec"), {"__name__": "__main__"})


@pytest.mark.parametrize(("where", "body"), program_blocks("import"), ids=[w for w, _ in program_blocks("import")])
def test_complete_programs_import(where: str, body: str):
    """Runs the definitions; the ``__main__`` part would start a population (tested elsewhere)."""
    namespace: dict = {"__name__": "docs_example"}
    exec(compile(body, where, "exec"), namespace)
    assert "__main__" in body


def test_marked_blocks_are_known_modes_and_there_are_some():
    modes = [(where, mode) for lang in ("python", "yaml", "bash") for where, mode, _, _ in blocks(lang) if mode]
    assert {mode for _, mode in modes} <= {"run", "import", "excerpt"}, modes
    assert program_blocks("run") and program_blocks("import")


def test_excerpts_match_their_files():
    excerpts = [(where, arg, body) for where, mode, arg, body in blocks("yaml") if mode == "excerpt"]
    assert excerpts
    for where, arg, body in excerpts:
        lines = iter(line.rstrip() for line in (REPO / arg).read_text().splitlines())
        for wanted in body.rstrip("\n").splitlines():
            assert any(line == wanted.rstrip() for line in lines), f"{where}: {wanted!r} is not in {arg} (in order)"


def digits_commands() -> list[tuple[str, list[str], str | None]]:
    """``(where, overrides, expected error)`` of every ``examples/digits.py`` command in a bash block,
    and of ``$ python examples/digits.py`` lines followed by their output in a plain block."""
    commands = []
    for where, _, _, body in blocks("bash") + blocks(""):
        lines = body.replace("\\\n", " ").splitlines()
        for i, line in enumerate(lines):
            if "examples/digits.py" not in line or line.lstrip().startswith("#"):
                continue
            words = shlex.split(line.split("examples/digits.py", 1)[1], comments=True)
            if "--cfg" in words:
                continue
            expected = lines[i + 1].split("invalid configuration: ", 1)[1] if line.startswith("$ ") else None
            commands.append((where, words, expected))
    return commands


def test_documented_hydra_commands_compose_and_validate():
    from hydra import compose, initialize_config_dir

    from lightning_pbt.tools.hydra_configs import build_callback, build_strategy, check_population, register_configs

    register_configs()
    commands = digits_commands()
    assert len(commands) >= 10 and any(expected for _, _, expected in commands)
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        for where, overrides, expected in commands:
            cfg = compose("digits", overrides=overrides)
            try:
                build_callback(cfg.pbt)
                strategy = build_strategy(cfg.strategy)
                check_population(
                    cfg.trainer, strategy.member_size, strategy.processes_per_device, strategy.members_per_process
                )
            except ValueError as error:
                assert expected == str(error), f"{where}: {overrides}: {error}"
            else:
                assert expected is None, f"{where}: {overrides} should fail with {expected!r}"


def test_readme_is_a_quick_start_whose_links_reach_the_site_pages():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    assert "make demo" in readme and "make test" in readme
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert len(links) >= 15
    for link in links:
        assert (REPO / link).is_file(), f"README links to {link}, which does not exist"
    linked = {REPO / link for link in links}
    guides = set((DOCS / "guides").glob("*.md")) | set((DOCS / "concepts").glob("*.md"))
    assert guides <= linked, f"README does not link {sorted(str(p.relative_to(REPO)) for p in guides - linked)}"


@pytest.mark.parametrize("module", ["lightning_pbt", *(f"lightning_pbt.{name}" for name in public_modules())])
def test_docstring_examples_run(module: str):
    """The ``>>>`` examples of the reference are doctests: they must still give what they show."""
    import doctest

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{module}: {result.failed} of {result.attempted} docstring examples failed"


def documented_parameters(obj: object) -> set[str]:
    """The names in the Args / Attributes sections of ``obj``'s docstring, parsed as the site parses it."""
    import inspect

    import griffe

    sections = griffe.Docstring(inspect.getdoc(obj) or "", parser="google").parse(warnings=False)
    return {
        item.name.lstrip("*")
        for section in sections
        if section.kind.value in ("parameters", "other parameters", "attributes")
        for item in section.value
    }


# Modules whose every public function and class documents every argument. Not yet: ready_steps
# (SynchronousReadySteps repeats ReadySteps' arguments) and transfer's functions, whose docstrings say
# what each does but not argument by argument.
FULLY_DOCUMENTED = [
    *("algorithm.exploit", "algorithm.explore", "algorithm.lineage", "algorithm.pb2", "algorithm.run_reading"),
    *("algorithm.scheduler", "algorithm.space", "algorithm.space_config", "algorithm.topology"),
    *("distributed.collectives", "distributed.groups", "distributed.serving"),
    *("plugin.apply", "plugin.callback", "plugin.internals", "plugin.readiness", "plugin.replay", "plugin.strategy"),
    *("plugin.trainer_member", "tools.hydra_configs", "tools.plots", "tools.report"),
]


def public_callables() -> list[tuple[str, object]]:
    import inspect

    found = {f"lightning_pbt.{name}": getattr(lightning_pbt, name) for name in lightning_pbt.__all__}
    for module in FULLY_DOCUMENTED:
        mod = importlib.import_module(f"lightning_pbt.{module}")
        found.update({f"lightning_pbt.{module}.{name}": getattr(mod, name) for name in mod.__all__})
    return [(path, obj) for path, obj in sorted(found.items()) if inspect.isclass(obj) or inspect.isfunction(obj)]


@pytest.mark.parametrize(("path", "obj"), public_callables(), ids=[path for path, _ in public_callables()])
def test_public_api_documents_every_argument(path: str, obj: object):
    import inspect

    try:
        signature = inspect.signature(obj)
    except ValueError:  # an exception class with the built-in constructor: nothing of ours to document
        assert isinstance(obj, type) and issubclass(obj, BaseException), path
        return
    wanted = {
        name for name, parameter in signature.parameters.items()
        if name != "self" and not name.startswith("_") and parameter.kind is not parameter.VAR_POSITIONAL
    }
    missing = sorted(wanted - documented_parameters(obj))
    assert not missing, f"{path}: the docstring's Args section does not document {missing}"


def test_no_patch_leftovers_are_tracked_and_gitignore_keeps_them_out():
    """``*.orig`` / ``*.rej`` files (what a failed ``patch`` leaves) are never committed, in any folder."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert not [path for path in tracked.splitlines() if path.endswith((".orig", ".rej"))]
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert "*.orig" in ignored and "*.rej" in ignored
