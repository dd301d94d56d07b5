#!/usr/bin/env bash
# What the test suite needs beyond requirements-dev.txt, for tests/test_visdom.py; each step is
# skipped when its result is already there, so the script is safe to rerun:
#   1. visdom 0.2.4 with tornado < 6.6. 0.2.4 is the newest release for Python 3.11; it is an sdist
#      whose setup.py imports pkg_resources (gone from setuptools 81), and tornado 6.6 answers 403
#      on its page.
#   2. visdom's JavaScript, CSS and fonts, which visdom does not ship: its server downloads them
#      from CDNs at start and dies when offline. The same files come from the npm registry
#      (`npm pack`, tarballs kept in a cache folder outside the repository) and are copied into
#      visdom's static folder, after which the server makes no network calls.
#   3. Debian's chromium, for the headless screenshot of the Visdom page (apt-get, as root or
#      through sudo).
# Users who only want to watch training need `pip install visdom`, not this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
NPM_CACHE=${DNC_NPM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pytorch-rnn-dev/npm}

# ---- 1. visdom
if "$PYTHON" - <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    visdom, tornado = version("visdom"), version("tornado")
except PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if tuple(int(part) for part in tornado.split(".")[:2]) < (6, 6) else 1)
EOF
then
    echo "install_dev: visdom present"
else
    constraints=$(mktemp)
    trap 'rm -f "$constraints"' EXIT
    echo 'setuptools<81' > "$constraints"
    PIP_CONSTRAINT="$constraints" "$PYTHON" -m pip install "visdom==0.2.4" "tornado<6.6"
fi

# ---- 2. visdom's static assets, from npm
NPM_CACHE="$NPM_CACHE" "$PYTHON" - <<'EOF'
import os
import subprocess
import tarfile

import visdom

static = os.path.join(os.path.dirname(visdom.__file__), "static")
cache = os.environ["NPM_CACHE"]
FONT, MATHJAX = "glyphicons-halflings-regular", "js/mathjax/2.7.5/"
# (npm package@version, file inside the package, destination under static/)
COPY = [
    ("jquery@3.1.1", "dist/jquery.min.js", "js/jquery.min.js"),
    ("bootstrap@3.3.7", "dist/js/bootstrap.min.js", "js/bootstrap.min.js"),
    ("bootstrap@3.3.7", "dist/css/bootstrap.min.css", "css/bootstrap.min.css"),
    ("react@16.2.0", "umd/react.production.min.js", "js/react-react.min.js"),
    ("react-dom@16.2.0", "umd/react-dom.production.min.js", "js/react-dom.min.js"),
    ("react-modal@3.1.10", "dist/react-modal.min.js", "js/react-modal.min.js"),
    ("plotly.js-dist-min@2.11.1", "plotly.min.js", "js/plotly-plotly.min.js"),
    ("sjcl@1.0.7", "sjcl.js", "js/sjcl.js"),
    ("layout-bin-packer@1.4.0", "dist/layout-bin-packer.js", "js/layout_bin_packer.js"),
    ("layout-bin-packer@1.4.0", "dist/layout-bin-packer.js.map", "js/layout-bin-packer.js.map"),
    ("d3@3.5.17", "d3.min.js", "js/d3.v3.min.js"),
    ("d3-selection-multi@1.0.1", "build/d3-selection-multi.min.js", "js/d3-selection-multi.v1.js"),
    ("save-svg-as-png@1.4.17", "lib/saveSvgAsPng.js", "js/saveSvgAsPng.js"),
    ("react-resizable@1.4.6", "css/styles.css", "css/react-resizable-styles.css"),
    ("react-grid-layout@0.16.3", "css/styles.css", "css/react-grid-layout-styles.css"),
    ("classnames@2.2.5", "index.js", "fonts/classnames"),
    ("bootstrap@3.3.7", f"dist/fonts/{FONT}.svg", f"fonts/{FONT}.svg#glyphicons_halflingsregular"),
]
COPY += [("bootstrap@3.3.7", f"dist/fonts/{FONT}.{ext}", f"fonts/{FONT}.{ext}")
         for ext in ("eot", "woff2", "woff", "ttf", "svg")]
COPY += [("mathjax@2.7.5", path, MATHJAX + path) for path in (
    "MathJax.js", "config/Safe.js", "config/TeX-AMS-MML_HTMLorMML.js", "extensions/Safe.js",
    "jax/output/SVG/fonts/TeX/fontdata.js", "jax/output/SVG/jax.js",
    "jax/output/SVG/fonts/TeX/Size1/Regular/Main.js", "jax/output/SVG/config.js")]

missing = [item for item in COPY if not os.path.isfile(os.path.join(static, item[2]))]
if not missing and os.path.isfile(os.path.join(static, "version.built")):
    print("install_dev: visdom assets present")
    raise SystemExit(0)


def tarball(package: str) -> str:
    """npm pack names the file <name>-<version>.tgz (scoped names do not occur here)."""
    return os.path.join(cache, package.replace("@", "-") + ".tgz")


os.makedirs(cache, exist_ok=True)
to_fetch = sorted({package for package, _, _ in missing if not os.path.isfile(tarball(package))})
if to_fetch:
    try:
        subprocess.run(["npm", "pack", "--silent", *to_fetch], cwd=cache, check=True, stdout=subprocess.DEVNULL)
    except FileNotFoundError:
        raise SystemExit("install_dev: npm is needed to fetch visdom's JavaScript assets (apt-get install npm)")
for package, member, destination in missing:
    out = os.path.join(static, destination)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with tarfile.open(tarball(package)) as archive, open(out, "wb") as file:
        file.write(archive.extractfile("package/" + member).read())
with open(os.path.join(static, "version.built"), "w") as file:
    file.write(visdom.__version__)
print(f"install_dev: copied {len(missing)} visdom assets into {static}")
EOF

# ---- 3. chromium
if command -v chromium >/dev/null; then
    echo "install_dev: chromium present"
else
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { echo "install_dev: installing chromium needs root or sudo" >&2; exit 1; }
        sudo="sudo"
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
    echo "install_dev: installed $(chromium --version 2>/dev/null)"
fi
