#!/usr/bin/env bash
# Set up decapflow in ./.venv (Python >= 3.10). Offline-safe where pip finds torch locally.
#   ./setup.sh            the package, its dependencies, the test tools and the docs tools (mkdocs)
#   ./setup.sh --browser  also Debian's chromium + chromium-driver (root), for the page test in headless Chromium
set -euo pipefail
cd "$(dirname "$0")"
if [[ "${1:-}" == "--browser" ]] && ! { command -v chromium && command -v chromedriver; } >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
PYTHON=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torchvision must match torch exactly; installing both first keeps pip from mixing builds.
.venv/bin/python -m pip install --quiet "torch>=2.1,<=2.14.1" "torchvision<=0.29.1"
.venv/bin/python -m pip install --quiet -e ".[dev,docs]"
echo "decapflow installed in $(pwd)/.venv: try  .venv/bin/decapflow --help"
