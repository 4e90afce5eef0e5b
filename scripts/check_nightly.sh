#!/usr/bin/env bash
# Runs the test suite against tf-nightly and keras-nightly in a fresh virtualenv.
#
#   scripts/check_nightly.sh [VENV_DIR]      (default /tmp/tlm-nightly)
#
# Installs tf-nightly, keras-nightly, the stable tensorboard, the package (editable,
# without its tensorflow / keras requirements, which the nightlies replace) and its
# other requirements with the [test] extras; then runs `python -m pytest tests`.
# The last line printed is a one-line summary (versions and pytest's counts); the
# full pytest output is in VENV_DIR/pytest.log. Exit status: pytest's.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-/tmp/tlm-nightly}"
PYTHON="${PYTHON:-python3}"
LOG="${VENV}/pytest.log"

if [[ ! -x "${VENV}/bin/python" ]]; then
  "${PYTHON}" -m venv "${VENV}"
fi
PY="${VENV}/bin/python"
"${PY}" -m pip install --quiet --upgrade pip
"${PY}" -m pip install --quiet --upgrade --pre tf-nightly keras-nightly
# The stable tensorboard, in place of the tb-nightly that tf-nightly may pull in
# (both provide the `tensorboard` package).
"${PY}" -m pip uninstall --quiet --yes tb-nightly >/dev/null 2>&1 || true
"${PY}" -m pip install --quiet --upgrade tensorboard
"${PY}" -m pip install --quiet --no-deps -e "${ROOT}"
# The package's other requirements and its [test] extras, from its own metadata.
mapfile -t REQUIREMENTS < <("${PY}" - <<'EOF'
import importlib.metadata
import re

for requirement in importlib.metadata.requires("tf_large_margin") or []:
  spec, _, marker = requirement.partition(";")
  name = re.split(r"[<>=!~\[ ]", spec.strip(), maxsplit=1)[0].lower()
  if name in ("tensorflow", "keras"):
    continue  # tf-nightly / keras-nightly
  if not marker.strip() or re.search(r"extra\s*==\s*['\"]test['\"]", marker):
    print(spec.strip())
EOF
)
"${PY}" -m pip install --quiet "${REQUIREMENTS[@]}"

VERSIONS="$("${PY}" -c '
import keras, tensorflow as tf
print(f"tensorflow {tf.__version__}, keras {keras.version()}")' 2>/dev/null)"

cd "${ROOT}"
set +e
TF_CPP_MIN_LOG_LEVEL=3 "${PY}" -m pytest -q -p no:cacheprovider tests >"${LOG}" 2>&1
STATUS=$?
set -e
RESULT="$(grep -E '^(=+ )?[0-9]+ (passed|failed|error)' "${LOG}" | tail -n 1 \
  | sed -E 's/^=+ //; s/ =+$//' || true)"
echo "check_nightly: ${VERSIONS}: ${RESULT:-no pytest summary (exit ${STATUS})} (log: ${LOG})"
exit "${STATUS}"
