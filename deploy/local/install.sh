#!/usr/bin/env bash
# Install what the local production stack (deploy/local/stack.py, `dpn stack up`) needs, only what is missing:
# Debian's PostgreSQL and Prometheus (apt-get, as root) and the project's `stack` extra (pip, with the
# project's constraints.txt). Safe to run again: it checks first and installs nothing when all is there.
#
# Debian's postinst scripts create PostgreSQL's own `main` cluster (port 5432) and, where the machine lets
# packages start services, start it and Prometheus (port 9090); the stack uses neither: it runs its own
# instances on its own ports (stop Debian's with `pg_ctlcluster 15 main stop` / `systemctl stop prometheus`).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
python=${PYTHON:-python}

missing_apt=()
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing_apt+=(postgresql)
command -v prometheus >/dev/null || missing_apt+=(prometheus)
if [ ${#missing_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: ${missing_apt[*]} missing; run as root, or: sudo apt-get install -y ${missing_apt[*]}" >&2
    exit 1
  fi
  echo "install.sh: apt-get install ${missing_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing_apt[@]}" >/dev/null
fi

# moto >= 5.2.5 (see pyproject.toml's stack extra), and the other imports the stack's services and e2e use
if ! "$python" - <<'PY'
import importlib.metadata as md
import sys
for module in ("flask", "flask_cors", "psycopg2", "boto3", "mlflow", "ray", "openai"):
    __import__(module)
version = tuple(int(p) for p in md.version("moto").split(".")[:3])
sys.exit(0 if version >= (5, 2, 5) else 1)
PY
then
  echo "install.sh: pip install -e '.[stack]' (the stack extra of pyproject.toml)"
  constraint=()
  [ -f "$repo/constraints.txt" ] && constraint=(--constraint "$repo/constraints.txt")
  PIP_CONSTRAINT="" "$python" -m pip install --quiet "${constraint[@]}" -e "$repo[stack]"
fi
