#!/usr/bin/env bash
# Checks a built fastbert wheel the way a user gets it: a fresh virtual environment in a temporary
# folder outside the checkout, the wheel installed there with the extras the checks need, and, from
# another temporary folder (so the checkout's fastbert/ cannot be imported), these checks:
#   1. fastbert is imported from that environment's site-packages, and its fastbert._C loads;
#   2. fastbert info;
#   3. scripts/wheel_smoke.py: one call of every op in fastbert.ops, with backward, on CPU (the
#      compiled kernels, against the float64 reference);
#   4. fastbert bench --quick --ops gelu (CPU, short cases);
#   5. fastbert pretrain: 2 steps of the tiny preset on the bundled Austen novels.
# Every check runs even when an earlier one fails; each prints its time; any failure fails the script.
#
# Usage: scripts/wheel_check.sh WHEEL
# The compiled extension only works with the torch it was built against, so torch (and triton) are
# constrained to the versions in the environment that built the wheel: FASTBERT_BUILD_PYTHON, default
# the checkout's .venv/bin/python (its `pip freeze` lines for torch and triton). Its interpreter also
# creates the new environment (the same Python version as the wheel's tag). pip may use its cache.
# WHEEL_CHECK_EXTRAS: the extras to install (default train,bench,triton).
# WHEEL_CHECK_KEEP=1 keeps the temporary folder (its path is printed).
set -uo pipefail
if [ $# -ne 1 ] || [ ! -f "$1" ]; then
    echo "usage: $0 WHEEL (a built fastbert-*.whl)" >&2
    exit 2
fi
wheel=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
root=$(cd "$(dirname "$0")/.." && pwd)
build_py=${FASTBERT_BUILD_PYTHON:-$root/.venv/bin/python}
extras=${WHEEL_CHECK_EXTRAS:-train,bench,triton}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/fastbert-wheel-check.XXXXXX")
if [ "${WHEEL_CHECK_KEEP:-0}" = 1 ]; then
    echo "wheel_check: keeping $tmp"
else
    trap 'rm -rf "$tmp"' EXIT
fi
lap=$(date +%s)
step() {  # step NAME: the time since the previous step
    local now
    now=$(date +%s)
    echo "wheel_check: $1 in $(( now - lap )) s"
    lap=$now
}

# The wheel's contents: fastbert/_C*.so, the bundled corpus, every package of the checkout's fastbert/
# (a folder with an __init__.py) and no module that it lacks, and nothing at the top level but fastbert/
# and its .dist-info.
"$build_py" - "$wheel" "$root" <<'EOF' || exit 1
import pathlib, sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
src = pathlib.Path(sys.argv[2])
packages = sorted(str(p.parent.relative_to(src)) for p in (src / "fastbert").rglob("__init__.py"))
problems = [f"no {p}/__init__.py" for p in packages if f"{p}/__init__.py" not in names]
if not any(n.startswith("fastbert/_C") and n.endswith(".so") and n.count("/") == 1 for n in names):
    problems.append("no fastbert/_C*.so")
if "fastbert/data/austen.tar.xz" not in names:
    problems.append("no fastbert/data/austen.tar.xz")
stale = sorted(n for n in names if n.endswith(".py") and not (src / n).is_file())
if stale:  # e.g. left in build/lib by an earlier build after the source was moved or deleted
    problems.append(f"modules not in the checkout: {', '.join(stale)}")
top = sorted({n.split("/")[0] for n in names} - {"fastbert"})
if any(not t.endswith(".dist-info") for t in top) or len(top) != 1:
    problems.append(f"top level holds {top} besides fastbert/ (one .dist-info expected)")
if problems:
    sys.exit("wheel_check: the wheel's contents: " + "; ".join(problems))
size = pathlib.Path(sys.argv[1]).stat().st_size / 2**20
print(f"wheel_check: contents ok: {len(names)} files, {size:.1f} MiB; packages {', '.join(packages)}")
EOF

# The environment: torch and triton as in the one that built the wheel (pip freeze spells a local
# version such as 2.14.1+cpu, which then needs its index, e.g. PIP_EXTRA_INDEX_URL).
"$build_py" -m pip freeze | grep -iE '^(torch|triton)==' > "$tmp/constraints.txt"
grep -qi '^torch==' "$tmp/constraints.txt" || { echo "wheel_check: no torch in $build_py's environment" >&2; exit 1; }
echo "wheel_check: $(basename "$wheel"); constraints: $(tr '\n' ' ' < "$tmp/constraints.txt")"
"$build_py" -m venv "$tmp/venv" || exit 1
py=$tmp/venv/bin/python
"$py" -m pip install -q -c "$tmp/constraints.txt" "$wheel[$extras]" || exit 1
step "fresh environment and install"

mkdir -p "$tmp/work"
cp "$root/scripts/wheel_smoke.py" "$tmp/work/"
cd "$tmp/work" || exit 1
export PATH="$tmp/venv/bin:$PATH"
unset PYTHONPATH
failed=()
check() {  # check NAME COMMAND...: runs it, records a failure
    echo "wheel_check: --- $1"
    if "${@:2}"; then step "$1: ok"; else step "$1: FAILED"; failed+=("$1"); fi
}

check "import from the environment" "$py" - "$tmp/venv" <<'EOF'
import json, os, subprocess, sys, sysconfig
import fastbert
where = os.path.realpath(fastbert.__file__)
sites = {os.path.realpath(sysconfig.get_path(k)) for k in ("purelib", "platlib")}
assert where.startswith(os.path.realpath(sys.argv[1])) and any(where.startswith(s + os.sep) for s in sites), \
    f"fastbert is imported from {where}, not from the environment's site-packages {sorted(sites)}"
info = json.loads(subprocess.run(["fastbert", "info", "--json"], check=True, capture_output=True, text=True).stdout)
assert info["extension"] is not None, f"fastbert._C does not load: {info['extension_error']}"
ext = os.path.realpath(info["extension"]["path"])
assert any(ext.startswith(s + os.sep) for s in sites), f"fastbert._C is loaded from {ext}"
print(f"fastbert {fastbert.__version__} from {where}; _C from {ext}")
EOF
check "fastbert info" fastbert info
check "ops forward and backward (wheel_smoke.py)" "$py" wheel_smoke.py
check "fastbert bench --quick --ops gelu" fastbert bench --quick --ops gelu --device cpu --case-seconds 2 \
    --no-plots --out "$tmp/bench"
check "fastbert pretrain (tiny, 2 steps)" fastbert pretrain --preset tiny --steps 2 --batch 8 --seq-len 64 \
    --vocab-size 2000 --save-every 2 --no-progress --out "$tmp/pretrain"

if [ ${#failed[@]} -gt 0 ]; then
    echo "wheel_check: FAILED: $(IFS=,; echo "${failed[*]}")"
    exit 1
fi
echo "wheel_check: passed"
