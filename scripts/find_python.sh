# Sourced by the setup scripts: first_python CHECK NAMES PYENV_GLOB prints the first Python that
# runs and passes CHECK (a Python expression over `sys`), trying the commands NAMES, then pyenv's
# installed versions matching PYENV_GLOB, oldest first; it fails if none does. A candidate must
# run: pyenv's shims answer `command -v` for versions installed but not selected, then fail.
first_python() {
  local check=$1 cands=$2 glob=$3 cand
  if command -v pyenv >/dev/null 2>&1; then
    cands="$cands $(ls -d "$(pyenv root)"/versions/$glob/bin/python3 2>/dev/null | sort -V \
        | tr '\n' ' ')"
  fi
  for cand in $cands; do
    if "$cand" -c "import sys; sys.exit(not ($check))" >/dev/null 2>&1; then
      echo "$cand"
      return 0
    fi
  done
  return 1
}
