"""``fastbert bench`` as an installed package: the suite is ``fastbert.bench`` (no top-level
``benchmarks`` import, no source tree on sys.path), results go to ``--out`` (default
``./fastbert-bench-results`` under the current directory), and a missing optional dependency is one
line and exit status 2. Never times anything."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastbert
from fastbert import cli
from fastbert.bench import run

ROOT = Path(__file__).resolve().parent.parent


def test_default_out_is_under_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = run.parse_args([])
    assert args.out == run.OUT == "fastbert-bench-results"
    assert Path(args.out).resolve() == tmp_path / "fastbert-bench-results"
    package = Path(fastbert.__file__).resolve().parent
    assert package not in Path(args.out).resolve().parents  # never into site-packages
    assert run.parse_args(["--out", "elsewhere"]).out == "elsewhere"


def test_help_names_the_default_out(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fastbert bench") and "./fastbert-bench-results" in out


def test_imports_from_any_directory_without_the_source_tree(tmp_path):
    """``import fastbert.bench.run`` with the cwd elsewhere and the checkout off PYTHONPATH: no
    ``benchmarks`` package, no ``fastbert.cli`` (no cycle), matplotlib not imported yet; the
    bench_<op> modules are found in the package."""
    code = (
        "import sys, pkgutil, fastbert.bench, fastbert.bench.run, fastbert.bench.plots, "
        "fastbert.bench.report\n"
        "assert 'benchmarks' not in sys.modules and 'fastbert.cli' not in sys.modules\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported before a plot is drawn'\n"
        "assert str(fastbert.bench.run.OUT) == 'fastbert-bench-results'\n"
        "names = {m.name for m in pkgutil.iter_modules(fastbert.bench.__path__)}\n"
        "assert {'bench_gelu', 'bench_realistic', 'harness', 'run'} <= names, names\n"
        "print('ok')\n"
    )
    pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(pythonpath))
    if not pythonpath:
        del env["PYTHONPATH"]
    got = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert got.returncode == 0 and got.stdout.strip() == "ok", got.stdout + got.stderr
    assert not (tmp_path / "benchmarks").exists()


@pytest.mark.parametrize(
    "missing, argv",
    [
        ("tqdm", ["--no-plots"]),
        ("matplotlib", []),  # plots wanted: said before the run, not after it
    ],
)
def test_missing_extra_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path, missing, argv):
    monkeypatch.setitem(sys.modules, missing, None)  # import fails as if not installed
    monkeypatch.setattr(run, "discover", lambda: pytest.fail("ran without " + missing))
    assert cli.main(["bench", "--ops", "gelu", "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"`{missing}`" in err and "pip install 'fastbert[bench]'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_git_commit_only_of_a_source_checkout(tmp_path, monkeypatch):
    """An installed fastbert (here: a site-packages inside some other git repository) stores no
    commit; the checkout fastbert runs from stores its own."""
    from fastbert.bench import report

    if subprocess.run(["git", "init", "-q", str(tmp_path)], capture_output=True).returncode != 0:
        pytest.skip("git not available")
    site = tmp_path / "venv" / "site-packages" / "fastbert" / "bench"
    site.mkdir(parents=True)
    checkout = report.git_commit()
    monkeypatch.setattr(report, "__file__", str(site / "report.py"))
    assert report.git_commit() is None
    if (ROOT / ".git").exists():
        assert (
            checkout
            and checkout.split("+")[0]
            in subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        )
