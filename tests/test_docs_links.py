"""Every relative link and every command named in README.md and docs/ resolves.

Checked without importing or running anything heavy (a second or two):
- relative links `[text](path#anchor)` point to existing files, and `#anchor`s to existing headings
  (GitHub's heading slugs) of markdown files;
- in code (fenced blocks and inline `code` spans): `make TARGET` names a Makefile target, `python -m MOD`
  a module (repository modules by their files, others by importlib.util.find_spec), `covid-dg SUB` a
  subcommand of the console script `setup.cfg` declares, `experiment=NAME` / `preset=NAME` /
  `PRESET=NAME` / `--preset NAME` a config file, `SWEEP=NAME` a sweep file, and a repository path such as
  `experiments/configs/base.yaml` an existing file or folder.

`covid-dg` subcommands: the dispatcher is found through `setup.cfg` (`[options.entry_points]`,
`console_scripts = covid-dg = MODULE:FUNC`, or `pyproject.toml` `[project.scripts]`); its source is parsed
(ast, not imported) and a documented subcommand must be one of its string literals. With no `covid-dg`
script declared, a documented `covid-dg SUB` is an error.
"""
from __future__ import annotations

import ast
import configparser
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("datamodules", "evaluation", "experiments", "lightning_modules", "rundir", "sweeps",
            "benchmarks", "tests", "tools", "docs")
CONFIGS = ROOT / "experiments" / "configs"


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md and docs/**/*.md, except docs/incoming/ (helpers' notes, waiting to be merged into the pages)."""
    return [root / "README.md"] + sorted(p for p in (root / "docs").rglob("*.md")
                                         if "incoming" not in p.relative_to(root / "docs").parts[:-1])


# ---------------------------------------------------------------- markdown parsing

FENCE = re.compile(r"^\s*(```|~~~)")


def split_code(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(prose lines with inline code removed, code snippets) as (line number, text)."""
    prose, code = [], []
    fenced = False
    block: list[str] = []
    start = 0
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            if fenced:
                # join backslash continuations, then one snippet per logical line
                joined = "\n".join(block).replace("\\\n", " ")
                code += [(start, ln) for ln in joined.splitlines()]
                block = []
            fenced = not fenced
            start = n + 1
            continue
        if fenced:
            block.append(line)
            continue
        spans = re.findall(r"(`+)(.+?)\1", line)
        code += [(n, s) for _, s in spans]
        prose.append((n, re.sub(r"(`+)(.+?)\1", " ", line)))
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    s = heading.strip().lower()
    s = re.sub(r"<[^>]+>", "", s)
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    out: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            k = seen.get(base, 0)
            seen[base] = k + 1
            out.add(base if k == 0 else f"{base}-{k}")
    return out


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def check_links(path: Path, text: str) -> list[str]:
    errors = []
    prose, _ = split_code(text)
    for n, line in prose:
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.name}:{n}: link {target!r}"
            if not dest.exists():
                errors.append(f"{where}: no file {dest}")
                continue
            if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                errors.append(f"{where}: no heading #{anchor} in {dest.name}")
    return errors


# ---------------------------------------------------------------- what exists

def make_targets(root: Path = ROOT) -> set[str]:
    text = (root / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([a-zA-Z][\w.-]*)\s*:(?!=)", text, re.M))


def module_exists(name: str, root: Path = ROOT) -> bool:
    top = name.split(".")[0]
    if (root / top).is_dir() or (root / f"{top}.py").is_file():
        base = root.joinpath(*name.split("."))
        return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file() \
            or (base / "__main__.py").is_file()
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def covid_dg_dispatcher(root: Path = ROOT) -> Path | None:
    """The file of the module behind the `covid-dg` console script, or None when none is declared."""
    spec = None
    cfg = root / "setup.cfg"
    if cfg.is_file():
        parser = configparser.ConfigParser()
        parser.read(cfg, encoding="utf-8")
        scripts = parser.get("options.entry_points", "console_scripts", fallback="")
        for line in scripts.splitlines():
            name, _, target = line.partition("=")
            if name.strip() == "covid-dg":
                spec = target.strip()
    toml = root / "pyproject.toml"
    if spec is None and toml.is_file():
        m = re.search(r'^\s*"?covid-dg"?\s*=\s*"([^"]+)"', toml.read_text(encoding="utf-8"), re.M)
        spec = m.group(1) if m else None
    if spec is None:
        return None
    base = root.joinpath(*spec.split(":")[0].strip().split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    raise AssertionError(f"covid-dg entry point {spec!r} names no module file under {root}")


def string_literals(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def config_names(group: str) -> set[str]:
    return {p.stem for p in (CONFIGS / group).glob("*.yaml")}


PLACEHOLDER = re.compile(r"[<>{}\[\]$*]|^[A-Z_]+$|^\.\.\.$")


def alternatives(value: str) -> list[str]:
    return [v for v in value.split("|") if v and not PLACEHOLDER.search(v)]


def check_commands(path: Path, text: str, root: Path = ROOT) -> list[str]:
    errors = []
    _, code = split_code(text)
    targets = make_targets(root)
    experiments = config_names("experiment")
    presets = config_names("preset")
    sweeps = {p.stem for p in (root / "sweeps").glob("*.yaml")}
    dispatcher = covid_dg_dispatcher(root)
    subcommands = string_literals(dispatcher) if dispatcher else set()
    for n, snippet in code:
        where = f"{path.name}:{n}: `{snippet.strip()[:80]}`"
        for m in re.finditer(r"(?:^|[\s;&|(])make((?:\s+[A-Z_]+=\S+)*)\s+([a-z][\w-]*)", snippet):
            if m.group(2) not in targets:
                errors.append(f"{where}: no Makefile target {m.group(2)!r}")
        for mod in re.findall(r"python[\d.]*\s+-m\s+([A-Za-z_][\w.]*)", snippet):
            if not module_exists(mod, root):
                errors.append(f"{where}: no module {mod!r}")
        for sub in re.findall(r"(?:^|[\s;&|(])covid-dg\s+([a-z][\w-]*)", snippet):
            if dispatcher is None:
                errors.append(f"{where}: `covid-dg {sub}` but no covid-dg console script is declared")
            elif sub not in subcommands:
                errors.append(f"{where}: covid-dg has no subcommand {sub!r} ({dispatcher.name})")
        for key, value in re.findall(r"(?:^|[\s\"'])(experiment|preset|PRESET|SWEEP|--preset)(?:=|(?<=--preset) )([\w|<>.$*-]+)",
                                     snippet):
            for v in alternatives(value):
                ok = {"experiment": v in experiments, "preset": v in presets,
                      "PRESET": v in experiments | {"full"}, "--preset": v in experiments | {"full"},
                      "SWEEP": v in sweeps}[key]
                if not ok:
                    errors.append(f"{where}: {key}={v}: no such config")
        for token in re.findall(r"(?:^|[\s=(\[,])((?:" + "|".join(PACKAGES) + r")/[\w./-]*)", snippet):
            token = token.rstrip(".,")
            if not (root / token).exists():
                errors.append(f"{where}: no path {token!r} in the repository")
    return errors


def check_file(path: Path, root: Path = ROOT) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return check_links(path, text) + check_commands(path, text, root)


# ---------------------------------------------------------------- the tests

@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_commands_resolve(path):
    errors = check_file(path)
    assert not errors, "\n".join(errors)


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n < 250, f"README.md has {n} lines; the reference belongs in docs/"


def test_every_docs_page_is_linked_from_the_index():
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    for page in sorted((ROOT / "docs").glob("*.md")):
        if page.name != "index.md":
            assert f"]({page.name})" in index, f"docs/index.md does not link {page.name}"


BAD = """# Title

## A section

See [the section](#a-section), [nothing](#no-such-heading), [a file](missing.md) and
[the README](../README.md#no-such-heading). [Web](https://example.org/x) is not checked.

```bash
make demo
make no-such-target
make sweep SWEEP=no_such_sweep PRESET=smoke
python -m experiments.loso --holdout mosmed experiment=no_such_scale preset=seed004
python -m experiments.no_such_module
python -m json.tool
```

Inline `python -m no_such_package.x`, `experiments/configs/base.yaml`, `experiments/no_such.py` and
`make lint`; text outside code like make foo is prose.
"""


def test_checker_finds_broken_links_and_commands(tmp_path):
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "page.md"
    page.write_text(BAD, encoding="utf-8")
    errors = check_links(page, BAD) + check_commands(page, BAD)
    text = "\n".join(errors)
    for expected in ("#no-such-heading", "missing.md", "README.md#no-such-heading",
                     "'no-such-target'", "SWEEP=no_such_sweep", "experiment=no_such_scale",
                     "'experiments.no_such_module'", "'no_such_package.x'", "'experiments/no_such.py'"):
        assert expected in text, f"missed {expected}:\n{text}"
    for fine in ("#a-section'", "'demo'", "'lint'", "'json.tool'", "preset=seed004:", "example.org",
                 "'experiments/configs/base.yaml'", "'foo'", "PRESET=smoke:"):
        assert fine not in text, f"false alarm on {fine}:\n{text}"
    assert len(errors) == 9, text


def test_covid_dg_subcommands_checked_against_the_dispatcher(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "cli.py").write_text('COMMANDS = {"loso": 1, "train": 2}\n', encoding="utf-8")
    (tmp_path / "setup.cfg").write_text("[options.entry_points]\nconsole_scripts =\n"
                                        "    covid-dg = pkg.cli:main\n", encoding="utf-8")
    (tmp_path / "Makefile").write_text("demo:\n\techo\n", encoding="utf-8")
    (tmp_path / "sweeps").mkdir()
    assert covid_dg_dispatcher(tmp_path) == tmp_path / "pkg" / "cli.py"
    md = "```\ncovid-dg loso --holdout mosmed\ncovid-dg nosuch\n```\n"
    errors = check_commands(tmp_path / "x.md", md, root=tmp_path)
    assert len(errors) == 1 and "'nosuch'" in errors[0], errors
    (tmp_path / "setup.cfg").write_text("[metadata]\nname = x\n", encoding="utf-8")
    errors = check_commands(tmp_path / "x.md", md, root=tmp_path)
    assert len(errors) == 2 and all("no covid-dg console script" in e for e in errors), errors


def test_slugs_match_github():
    assert slug("Checking data: `datamodules.verify`, bad input, duplicates") == \
        "checking-data-datamodulesverify-bad-input-duplicates"
    assert slug("Stages: plan, train, predict, score") == "stages-plan-train-predict-score"
    assert slug("Image-mask alignment: measured on your files") == "image-mask-alignment-measured-on-your-files"
