#!/usr/bin/env bash
# Validates the deployment and observability files (`make lint-infra`, part of
# `make test`): the Dockerfile, the compose stack, NATS settings, Prometheus
# configuration and alert rules, the Grafana dashboard and provisioning, and
# the Kubernetes manifests (every kustomize target rendered without kubectl by
# render_kustomize.py and validated with kubernetes-validate's bundled schemas
# for Kubernetes $KUBERNETES_VERSION; no cluster and no network needed after
# the first run).
#
# Installs what it needs: python3 and python3-venv from Debian when missing
# (as root, or through sudo), then pinned Python packages from PyPI into a
# virtualenv under .local/lint-venv, reused by later runs. Prints one line per
# check and exits non-zero when any fails.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LINT_DIR="$ROOT/infra/lint"
VENV=${LINT_VENV:-$ROOT/.local/lint-venv}
export KUBERNETES_VERSION=${KUBERNETES_VERSION:-1.30.0}

# Pinned, with their dependencies, so every run validates the same way.
# kubernetes-validate ships the Kubernetes JSON schemas inside the package.
REQUIREMENTS=(
  kubernetes-validate==1.37.0
  yamllint==1.38.0
  PyYAML==6.0.3
  promql-parser==0.11.0
  jsonschema==4.26.0
  jsonschema-specifications==2025.9.1
  referencing==0.37.0
  rpds-py==2026.9.1
  attrs==26.1.0
  importlib_resources==7.1.0
  packaging==26.3
  typing_extensions==4.16.0
  pathspec==1.1.1
)

started=$(date +%s)
log() { printf '[lint-infra] %s\n' "$*" >&2; }
die() { printf '[lint-infra] ERROR: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else die "need root (or sudo) to run: $*"; fi
}

apt_updated=
apt_install() {
  command -v apt-get >/dev/null || die "cannot install $* (no apt-get); install them and run again"
  log "installing Debian packages: $*"
  if [ -z "$apt_updated" ]; then as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

setup_venv() {
  command -v python3 >/dev/null || apt_install python3 python3-venv
  local stamp="$VENV/.lint-requirements" want
  want="${REQUIREMENTS[*]}"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c 'import kubernetes_validate, yaml, promql_parser' 2>/dev/null; then
    return 0
  fi
  if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
      # Debian's python3 has no ensurepip without python3-venv.
      rm -rf "$VENV"
      apt_install python3-venv
      python3 -m venv "$VENV" || die "cannot create a virtualenv in $VENV with $(command -v python3)"
    fi
  fi
  log "installing pinned lint tools into $VENV (first run only)"
  PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 \
    "$VENV/bin/python" -m pip install -q "${REQUIREMENTS[@]}" \
    || die "pip install failed (PyPI reachable?): ${REQUIREMENTS[*]}"
  echo "$want" >"$stamp"
}

# One setup at a time (parallel make targets share the virtualenv).
mkdir -p "$(dirname "$VENV")"
if command -v flock >/dev/null; then
  exec 9>"$(dirname "$VENV")/.lint-venv.lock"
  flock 9
  setup_venv
  flock -u 9
else
  setup_venv
fi

cd "$ROOT"
status=0

mapfile -t yaml_files < <(find infra -type f \( -name '*.yaml' -o -name '*.yml' \) | sort)
if "$VENV/bin/yamllint" -s -f parsable -c "$LINT_DIR/yamllint.yaml" "${yaml_files[@]}"; then
  echo "PASS yamllint: ${#yaml_files[@]} files (infra/lint/yamllint.yaml)"
else
  echo "FAIL yamllint: see the lines above"
  status=1
fi

"$VENV/bin/python" "$LINT_DIR/check_infra.py" || status=1

elapsed=$(( $(date +%s) - started ))
if [ "$status" = 0 ]; then
  echo "lint-infra: all checks passed in ${elapsed}s"
else
  echo "lint-infra: FAILED (${elapsed}s); fix the problems listed above" >&2
fi
exit "$status"
