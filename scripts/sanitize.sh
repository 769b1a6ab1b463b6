#!/usr/bin/env bash
# Memory-safety run of the Cython backend: AddressSanitizer + UndefinedBehaviorSanitizer.
#
#   bash scripts/sanitize.sh            # address,undefined; ~10-20 min on 2 busy cores
#   FASTNN_SANITIZE=address bash scripts/sanitize.sh
#   SANITIZE_TESTS="tests/test_parity.py" bash scripts/sanitize.sh
#   SANITIZE_QUICK=1 bash scripts/sanitize.sh   # baseline variant only (a third of the build)
#
# What it does:
#  1. a scratch venv that sees this Python's packages (NumPy, SciPy, Cython, pytest,
#     hypothesis: a .pth of its site-packages) gets fastnn built from a copy of this tree with
#     FASTNN_SANITIZE=address,undefined (setup.py adds -fsanitize=... -fno-omit-frame-pointer
#     -g to every Cython extension, all CPU variants included);
#  2. Python itself is not instrumented, so the ASan runtime is preloaded (LD_PRELOAD of
#     gcc's libasan) and leak detection is off (CPython keeps objects alive until exit by
#     design); PYTHONMALLOC=malloc puts Python's own allocations under ASan too;
#  3. the cython backend's tests run from outside the tree with FASTNN_BACKEND=cython: the
#     parity suite, the backend's own tests, every CPU variant against the baseline, the
#     fuzzing through the gate (more examples than in CI), four Python threads at once.
#     numba (and with it the cuda backend) is made unimportable: its LLVM JIT and the
#     OpenBLAS/simulator code are not built for the sanitizers, and their tests skip;
#  4. the parity suite and the backend tests again under each other CPU variant this
#     machine runs (FASTNN_CPU_VARIANT), since a run loads one variant as the backend.
#  5. a misaligned array (an odd byte offset into a buffer) through the gate: UBSan reports
#     every misaligned load, so the fuzzing of step 3 leaves such arrays out
#     (FASTNN_FUZZ_ALIGNED=1) and this step checks them alone.
# Any ASan report aborts the test process; any UBSan "runtime error" fails the run
# (halt_on_error, and the log is searched for reports as well). Exit status: 0 clean,
# 1 sanitizer reports (the scratch folder is kept), 3 clean but for misaligned arrays.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/fastnn-sanitize.XXXXXX")"
keep="${SANITIZE_KEEP:-0}"
cleanup() { [ "$keep" = 1 ] && echo "kept $work" || rm -rf "$work"; }
trap cleanup EXIT
python="${PYTHON:-python3}"
sanitize="${FASTNN_SANITIZE:-address,undefined}"
quick="${SANITIZE_QUICK:-0}"
tests="${SANITIZE_TESTS:-tests/test_parity.py tests/test_cython.py tests/test_cpu_variants.py tests/test_fuzz.py tests/test_threads.py tests/test_validate.py tests/test_backend.py tests/test_optimizer_steps.py}"
variant_tests="${SANITIZE_VARIANT_TESTS:-tests/test_parity.py tests/test_cython.py}"
log="$work/sanitize.log"
started=$SECONDS
step() { printf '\n=== %s (%ss) ===\n' "$*" "$((SECONDS - started))" | tee -a "$log"; }

command -v gcc >/dev/null || { echo "sanitize.sh needs gcc (for the ASan runtime)"; exit 2; }
libasan="$(gcc -print-file-name=libasan.so)"
[ -f "$libasan" ] || { echo "gcc's libasan.so was not found ($libasan)"; exit 2; }

step "1. scratch venv, fastnn built with FASTNN_SANITIZE=$sanitize"
"$python" -m venv "$work/venv"
# this Python's packages as plain path entries (not --system-site-packages, which would
# also run its .pth files: an editable fastnn install there would resolve modules the
# scratch install lacks from the checkout)
"$work/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" >/dev/null
"$python" -c "import sysconfig; print(sysconfig.get_paths()['purelib']); print(sysconfig.get_paths()['platlib'])" \
  | sort -u > "$("$work/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_base_packages.pth"
mkdir -p "$work/src"
# the tracked and untracked (not ignored) files: no build outputs of the checkout
(cd "$root" && git ls-files -z --cached --others --exclude-standard) \
  | (cd "$root" && xargs -0 cp --parents -t "$work/src" 2>/dev/null) \
  || cp -r "$root/." "$work/src"
rm -rf "$work/src/build" "$work/src/kernels"/*.so "$work/src/kernels"/_cy_*.c
if [ "$quick" = 1 ]; then export FASTNN_CPU_VARIANTS=0; fi   # setup.py: baseline only
FASTNN_SANITIZE="$sanitize" "$work/venv/bin/python" -m pip install -q --no-deps \
  --no-build-isolation --disable-pip-version-check "$work/src" >> "$log" 2>&1 \
  || { tail -40 "$log"; exit 1; }

mkdir -p "$work/stubs/numba" "$work/run"
cat > "$work/stubs/numba/__init__.py" <<'PY'
raise ImportError("numba is left out of the sanitizer run (scripts/sanitize.sh)")
PY
cp -r "$root/tests" "$work/run/tests"

export LD_PRELOAD="$libasan${LD_PRELOAD:+ $LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:strict_init_order=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export PYTHONMALLOC=malloc
export PYTHONPATH="$work/stubs"
export FASTNN_BACKEND=cython
export FASTNN_FUZZ_EXAMPLES="${FASTNN_FUZZ_EXAMPLES:-40}"
export FASTNN_FUZZ_ALIGNED=1     # misaligned arrays: step 5 checks them apart
export NUMBA_CACHE_DIR="$work/numba-cache"
export CI="${CI:-true}"
py="$work/venv/bin/python"
cd "$work/run"

step "2. the installed extensions are instrumented"
"$py" - <<'PY' 2>&1 | tee -a "$log"
import ctypes, fastnn
from fastnn.kernels import cython_cpu as c
assert "/venv/" in fastnn.__file__, fastnn.__file__
print("fastnn from", fastnn.__file__)
print("cython backend:", fastnn.backends()["cython"], "variant", c.CPU_VARIANT,
      "built", c.built_variants())
print("numba:", fastnn.backends()["numba"].reason)
for ext in c._EXTENSIONS:
    lib = ctypes.CDLL(ext.__file__)
    assert hasattr(lib, "__asan_version_mismatch_check_v8") or any(
        hasattr(lib, s) for s in ("__asan_report_load4", "__asan_init")), ext.__file__
print("ASan symbols present in every extension")
PY

run_pytest() {
  local status=0
  # --capture=sys: a sanitizer report (written to fd 2 just before the process exits)
  # reaches the log instead of dying in pytest's capture
  "$py" -m pytest -q -p no:cacheprovider --capture=sys -k "not numba and not cuda" "$@" 2>&1 \
    | tee -a "$log" || status=$?
  return $status
}

step "3. the cython backend's tests under the sanitizers (default variant)"
# shellcheck disable=SC2086
run_pytest $tests

for variant in $("$py" -c "from fastnn.kernels import cython_cpu as c; print(' '.join(v for v in c.VARIANTS if v in c.cpu_levels() and v in c.built_variants() and v != c.CPU_VARIANT))"); do
  step "4. parity and backend tests with FASTNN_CPU_VARIANT=$variant"
  # shellcheck disable=SC2086
  FASTNN_CPU_VARIANT="$variant" run_pytest $variant_tests
done

step "5. misaligned arrays (numpy.ndarray with an odd byte offset)"
misaligned=0
"$py" - > "$work/misaligned.log" 2>&1 <<'PY' || misaligned=1
import numpy as np, fastnn
raw = np.zeros(8 * 1001 + 8, np.uint8)
z = np.ndarray((1000,), np.float64, buffer=raw, offset=2)
z[:] = np.linspace(-3, 3, 1000)
out = np.empty(1000)
try:
    fastnn.ops.activation_forward("sigmoid", z, out)
    print("the gate accepts a misaligned array; the kernel ran")
except ValueError as exc:
    print("the gate rejects a misaligned array:", exc)
PY
tee -a "$log" < "$work/misaligned.log" | grep -v "^ *#" | head -8
if [ "$misaligned" = 1 ]; then
  echo "FINDING: misaligned arrays pass fastnn's gate and the kernels load them misaligned" \
       "(undefined behaviour in C; UBSan reports it above). fastnn._validate should reject" \
       "arrays whose flags.aligned is False." | tee -a "$log"
fi

step "6. reports in the log"
if grep -v "misaligned" "$log" | grep -E "runtime error:|ERROR: AddressSanitizer|ERROR: LeakSanitizer"; then
  echo "sanitizer reports found (log: $log)"; keep=1; exit 1
fi
if [ "$misaligned" = 1 ]; then
  echo "clean but for misaligned arrays (step 5) ($((SECONDS - started)) s)"; exit 3
fi
echo "clean: no AddressSanitizer or UndefinedBehaviorSanitizer report ($((SECONDS - started)) s)"
