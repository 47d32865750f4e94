#!/usr/bin/env bash
# Build the offline install bundle: every wheel fdpg-scale needs on a GPU node beyond what its image already
# has (torch, triton, transformers, accelerate and their own requirements), for a node with no package index.
#   bash scripts/offline_wheels.sh DIR [--python-version 3.12]
# Run where the package index is reachable, from a checkout with .venv (scripts/setup.sh; FDPG_PYTHON
# overrides the interpreter that runs pip). DIR receives the wheels (manylinux x86_64, CPython of the given
# version) and BUNDLE.txt (name==version of each, and the image versions they were resolved against).
# On the node: scripts/gpu_check.sh --wheels DIR installs them with --no-index.
#
# How: DeepSpeed's PyPI release is an sdist, so it is built here as a wheel with its C++/CUDA ops off
# (DS_BUILD_OPS=0: they are JIT-built on first use on the node, as on any install). pip's resolver then
# finds the closure of pyproject.toml's dependencies for the target Python and platform (versions pinned by
# requirements/lock.txt where it has them), and the closure of the image's packages at IMAGE versions; the
# bundle is the difference, plus DeepSpeed's own small closure (which images often lack). Heavy packages that
# only offline analysis uses (HEAVY_OPTIONAL below) are left out so that the bundle stays within MAX_MIB.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "offline_wheels: $*" >&2; exit 2; }
[ $# -ge 1 ] || die "usage: scripts/offline_wheels.sh DIR [--python-version 3.12]"
out="$1"; shift
pyver=3.12
while [ $# -gt 0 ]; do
    case "$1" in
        --python-version) [ $# -ge 2 ] || die "--python-version needs a value"; pyver="$2"; shift 2 ;;
        *) die "unknown argument $1" ;;
    esac
done
[[ "$pyver" =~ ^3\.[0-9]+$ ]] || die "--python-version must look like 3.12, got $pyver"
python="${FDPG_PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || die "$python is not an interpreter (run scripts/setup.sh, or set FDPG_PYTHON)"
# What a typical GPU image already has (its torch is the CUDA build these versions name).
IMAGE="${FDPG_IMAGE_PACKAGES:-torch==2.11.0 triton==3.6.0 transformers==5.17.0 accelerate}"
# Used by fdpg-scale's offline analysis only (reproduce's t-test, report and reproduce plots): about 55 MiB of
# wheels together, more than the budget. Training and the GPU check never import them.
HEAVY_OPTIONAL="scipy matplotlib contourpy fonttools kiwisolver"
MAX_MIB=48
started=$(date +%s)
mkdir -p "$out"
work="$(mktemp -d)"
trap '[ -n "${FDPG_KEEP_WORK:-}" ] || rm -rf "$work"' EXIT
target=(--only-binary=:all: --python-version "$pyver" --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

# 1. DeepSpeed as a wheel, ops off (a pure-Python wheel; --no-build-isolation: its setup.py imports torch,
#    which .venv has, instead of downloading a CUDA torch into a build environment).
ds_version="$(grep -i '^deepspeed==' "$root/requirements/lock.txt" | cut -d= -f3)"
[ -n "$ds_version" ] || die "requirements/lock.txt pins no deepspeed version"
rm -f "$out"/deepspeed-*.whl
echo "offline_wheels: building deepspeed $ds_version as a wheel (DS_BUILD_OPS=0)"
DS_BUILD_OPS=0 "$python" -m pip wheel --quiet --no-deps --no-build-isolation -w "$out" "deepspeed==$ds_version"
ds_wheel="$(ls "$out"/deepspeed-*.whl)"

# 2. The closures, resolved for the target (a dry run: only metadata is fetched). The image's torch and triton
#    enter as metadata-only stand-ins (version +image): resolving the real CUDA torch would chase its
#    nvidia-* wheels, which the image has and the bundle never carries. The stand-in torch keeps the
#    requirements every torch build has; the image's transformers and accelerate are resolved for real.
stubs="$work/stubs"
"$python" - "$stubs" "$IMAGE" <<'PY'
import re, sys, zipfile
from pathlib import Path
out, image = Path(sys.argv[1]), dict(x.split("==") for x in sys.argv[2].split() if "==" in x)
out.mkdir(parents=True)
requires = {"torch": ["filelock", "typing-extensions>=4.10.0", "sympy>=1.13.3", "networkx>=2.5.1", "jinja2",
                      "fsspec>=0.8.5", f"triton=={image.get('triton', '0')}+image"], "triton": []}
for name, deps in requires.items():
    if name not in image:
        continue
    version = f"{image[name]}+image"
    info = f"{name}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {d}\n" for d in deps)
    with zipfile.ZipFile(out / f"{name}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{info}/METADATA", meta)
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: fdpg-scale\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
PY
"$python" - "$root/pyproject.toml" "$work/project.txt" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
deps = project["dependencies"] + project["optional-dependencies"]["test"]  # pytest: the GPU check runs tests
open(sys.argv[2], "w").write("\n".join(d for d in deps if not d.lower().startswith("deepspeed")) + "\n")
PY
# The lock as constraints, minus what the image decides (its torch, triton and transformers).
grep -v -i -E '^(torch|triton|transformers|accelerate)==' "$root/requirements/lock.txt" > "$work/lock.txt"
printf '%s\n' $IMAGE | sed -E 's/^(torch|triton)==(.*)$/\1==\2+image/' > "$work/image.txt"
resolve() {  # resolve REPORT ARGS...: the packages pip would install, as a JSON report
    local report="$1"; shift
    "$python" -m pip install --quiet --dry-run --ignore-installed --target "$work/t" "${target[@]}" \
        --find-links "$out" --find-links "$stubs" --report "$report" "$@" 2>&1 \
        | grep -v -E "^WARNING: Location .* is ignored" || true
    [ -s "$report" ] || die "pip could not resolve: see above"
}
echo "offline_wheels: resolving the image's and the project's closures for CPython $pyver manylinux x86_64"
resolve "$work/image.json" -r "$work/image.txt"
# The lock's pins for what the image does not decide (the lock was made beside another transformers).
"$python" - "$work/image.json" "$work/lock.txt" <<'PY'
import json, re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
image = {norm(i["metadata"]["name"]) for i in json.load(open(sys.argv[1]))["install"]}
lines = [l for l in open(sys.argv[2]) if l.strip() and not l.startswith("#")]
open(sys.argv[2], "w").write("".join(l for l in lines if norm(l.split("==")[0]) not in image))
PY
resolve "$work/full.json" -c "$work/lock.txt" -c "$work/image.txt" -r "$work/project.txt" "$ds_wheel"
resolve "$work/deepspeed.json" -c "$work/lock.txt" -c "$work/image.txt" "$ds_wheel"
resolve "$work/torch.json" -c "$work/image.txt" torch
"$python" - "$work/full.json" "$work/image.json" "$HEAVY_OPTIONAL" "$work/bundle.txt" "$work/deepspeed.json" \
    "$work/torch.json" <<'PY'
import json, re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
items = lambda path: {norm(i["metadata"]["name"]): i["metadata"]["version"] for i in json.load(open(path))["install"]}
full, image = items(sys.argv[1]), items(sys.argv[2])
ds = {n: v for n, v in items(sys.argv[5]).items() if n not in items(sys.argv[6])}  # minus torch's closure
heavy = {norm(n) for n in sys.argv[3].split()}
# DeepSpeed's own closure always travels, small as it is (a few MiB without torch's and numpy): images that
# have transformers often lack what only DeepSpeed needs (pydantic, pydantic-core, annotated-types,
# typing-inspection, hjson, py-cpuinfo, ...) even where pip's resolution of the image would include it.
# pip skips whatever the node already has.
always = {n for n in ds if n not in ("numpy", "deepspeed")}
bundle = sorted((n, v) for n, v in full.items()
                if (n not in image or n in always) and n not in heavy and n != "deepspeed")
open(sys.argv[4], "w").write("".join(f"{n}=={v}\n" for n, v in bundle))
print(f"offline_wheels: {len(full)} packages in the closure, {len(image)} come with the image, "
      f"{len([n for n in full if n in heavy])} heavy optional left out, {len(bundle)} + deepspeed to download")
PY

# 3. The wheels themselves.
"$python" -m pip download --quiet --no-deps "${target[@]}" -d "$out" -r "$work/bundle.txt" 2>&1 \
    | grep -v -E "^WARNING: Location .* is ignored" || true
while read -r req; do  # every pinned wheel arrived
    name="${req%%==*}"; version="${req##*==}"
    ls "$out" | grep -i -q -E "^${name//-/[-_.]}-${version}-" || die "no wheel for $req in $out"
done < "$work/bundle.txt"
{
    echo "# fdpg-scale offline bundle for CPython $pyver manylinux x86_64, built $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "# resolved against the image's: $IMAGE"
    echo "# left out (offline analysis only): $HEAVY_OPTIONAL"
    echo "deepspeed==$ds_version"
    cat "$work/bundle.txt"
} > "$out/BUNDLE.txt"
# 4. The bundle is closed: with the image's packages as metadata-only stand-ins, everything the project
#    needs (but HEAVY_OPTIONAL) installs from the bundle alone (--no-index, a dry run).
"$python" - "$work/image.json" "$work/image-all" "$work/project.txt" "$HEAVY_OPTIONAL" "$work/needed.txt" <<'PY'
import json, re, sys, zipfile
from pathlib import Path
out = Path(sys.argv[2]); out.mkdir()
for item in json.load(open(sys.argv[1]))["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    stem = f"{re.sub(r'[-.]+', '_', name)}-{version}"
    with zipfile.ZipFile(out / f"{stem}-py3-none-any.whl", "w") as z:
        z.writestr(f"{stem}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{stem}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: fdpg-scale\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{stem}.dist-info/RECORD", "")
heavy = set(sys.argv[4].split())
names = [re.split(r"[<>=!~;\[ ]", line.strip())[0] for line in open(sys.argv[3]) if line.strip()]
open(sys.argv[5], "w").write("\n".join(n for n in names if n not in heavy) + "\n")
PY
if ! msg="$("$python" -m pip install --quiet --dry-run --no-index --ignore-installed --target "$work/t2" \
        "${target[@]}" --find-links "$out" --find-links "$work/image-all" -r "$work/needed.txt" deepspeed 2>&1)"; then
    echo "$msg" | grep -v -E "^WARNING: Location .* is ignored" | tail -5 >&2
    die "the bundle is not closed: pip cannot install the project from it and the image alone (above)"
fi
mib=$(( $(du -sk "$out" | cut -f1) / 1024 ))
echo "offline_wheels: $(ls "$out"/*.whl | wc -l) wheels, ${mib} MiB in $out, $(( $(date +%s) - started )) s"
[ "$mib" -le "$MAX_MIB" ] || die "the bundle is ${mib} MiB, above the ${MAX_MIB} MiB budget"
