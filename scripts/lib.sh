# Shared by scripts/run and scripts/test: find Python 3.11+, make the venv, install.
# Sourced, not executed. Works as root and as an ordinary user.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SMTP_PROXY_VENV:-$ROOT/.venv}"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Run a command as root: directly when we are root, else through sudo.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else die "need root to run: $* (no sudo available)"
  fi
}

apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "cannot install $* without apt-get; install it by hand"
  say "installing Debian packages: $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

find_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  die "Python 3.11 or newer is required (set PYTHON=/path/to/python3.11)"
}

# ensure_venv EXTRA: create the venv and (re)install the project when setup.cfg changed.
ensure_venv() {
  local extra="$1" python stamp want
  if [ ! -x "$VENV/bin/python" ]; then
    python="$(find_python)"
    say "creating virtualenv $VENV with $python"
    if ! "$python" -m venv "$VENV" 2>/dev/null; then
      rm -rf "$VENV"
      # Debian splits venv/ensurepip out of the interpreter package.
      apt_install "python3-venv"
      "$python" -m venv "$VENV" || die "could not create $VENV"
    fi
  fi
  stamp="$VENV/.smtp-proxy-installed"
  want="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1) $extra"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    say "installing smtp-proxy${extra:+ [$extra]} into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
    if ! "$VENV/bin/python" -m pip install --disable-pip-version-check \
        -e "$ROOT${extra:+[$extra]}" > "$VENV/pip-install.log" 2>&1; then
      tail -n 30 "$VENV/pip-install.log" >&2
      die "pip install failed (full log: $VENV/pip-install.log)"
    fi
    printf '%s' "$want" > "$stamp"
  fi
}
