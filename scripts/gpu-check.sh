#!/usr/bin/env bash
# shellcheck disable=SC2329  # the step_* functions are called indirectly, as "step_$step"
# The device check of cloakbench (issue 20): one script, under 8 minutes on an H100/H200, that installs what is
# missing, runs `pytest -m gpu`, `cloakbench bench --device cuda --quick` (and the full bench if time is left),
# the facecure-tiny suite on CUDA, the sync-debug check and CPU vs GPU embeddings, and writes one report:
# benchmarks/results/<UTC date>_gpu.md (copied to $OUT when OUT is set). Every step has its own time limit;
# a failed step is recorded and the next one runs; the exit code is 1 when any step failed.
#
#   bash scripts/gpu-check.sh                      # every step (CUDA if torch sees it, else the CPU fallback)
#   bash scripts/gpu-check.sh --steps sync,parity  # a subset (setup always runs first)
#   bash scripts/gpu-check.sh --cpu                # force the CPU fallback: reduced sizes, *_cpu-fallback.md
#   bash scripts/gpu-check.sh --dry-run            # print the steps and their limits, run nothing
#   bash scripts/gpu-check.sh --prepare-carry      # here, before a device run: fill .gpu-carry/ (docs/gpu.md)
#
# Options: --out DIR (report folder; default benchmarks/results), --work DIR (step outputs; default a new
# folder under /tmp), --faces N (demo faces of the sync and parity steps; default 32 on a GPU, 4 and 32 on
# the CPU). Environment: PYTHON (default python3: on the device, the image's python with its CUDA
# torch; torch is never installed by this script), GPU_CHECK_CARRY (default .gpu-carry: the carried cache and
# data), GPU_CHECK_FAIL=<step> (make that step fail on purpose: tests the failure path), OUT (device tool).
# Steps: setup sync parity pytest bench suite bench-full. docs/gpu.md says what each measures.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
PY=${PYTHON:-python3}
CARRY=${GPU_CHECK_CARRY:-.gpu-carry}
ALL_STEPS="setup sync parity pytest bench suite bench-full"
BUDGET_S=450 # the steps' share of the 8 minutes on a device (start-up and transfers take the rest)

usage() { sed -n '3,21p' "$0" | sed 's/^# \{0,1\}//'; }

force_cpu=0 dry_run=0 prepare=0 steps_arg="" report_dir="benchmarks/results" work="" faces=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) force_cpu=1 ;;
    --dry-run) dry_run=1 ;;
    --prepare-carry) prepare=1 ;;
    --steps) steps_arg=${2:-}; shift ;;
    --steps=*) steps_arg=${1#--steps=} ;;
    --out) report_dir=${2:-}; shift ;;
    --work) work=${2:-}; shift ;;
    --faces) faces=${2:-}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "gpu-check: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# ---- --prepare-carry: copy the files a device run needs from this machine's cache into $CARRY ----
if [ "$prepare" = 1 ]; then
  mkdir -p "$CARRY" || exit 2
  if ! git check-ignore -q "$CARRY" 2>/dev/null; then
    mkdir -p "$(git rev-parse --git-path info)" && echo "/${CARRY#./}/" >>"$(git rev-parse --git-path info/exclude)"
    echo "gpu-check: added /${CARRY#./}/ to $(git rev-parse --git-path info/exclude) (git must ignore it to carry it)"
  fi
  exec "$PY" - "$CARRY" <<'EOF'
"""Copy, from this machine's cloakbench cache, every file that loading the white-box zoo models, LPIPS and the
demo faces opens (seen with an audit hook), into <carry>/cache with the cache's layout, the smallest first,
while the whole working tree stays under the device's 64 MiB; print what fits and what does not."""
import os, shutil, subprocess, sys
from pathlib import Path

carry = Path(sys.argv[1]).resolve()
from cloakbench.cache import cache_root

root = cache_root()
opened: set[Path] = set()

def hook(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], (str, os.PathLike)):
        p = Path(args[0]).resolve()
        if p.is_relative_to(root) and p.is_file():
            opened.add(p)

def files_of(load) -> list[Path]:
    opened.clear()
    load()
    return sorted(opened)

sys.addaudithook(hook)
from cloakbench.attacks.recognizers import RECOGNIZERS
from cloakbench.datasets.demo import demo_dataset
import torch

def demo() -> None:
    folder, _ = demo_dataset()
    opened.update(p for p in folder.rglob("*") if p.is_file())

def lpips() -> None:
    from cloakbench.defenses.lpips import lpips as f
    x = torch.rand(1, 3, 112, 112)
    f(x, x)

groups: dict[str, list[Path]] = {"demo faces (celeb5)": files_of(demo), "lpips (lowkey)": files_of(lpips)}
for e in RECOGNIZERS:
    if "white-box" in e.meta.tags:
        groups[e.name] = files_of(lambda n=e.name: RECOGNIZERS.create(n))
tree = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], capture_output=True, check=True)
base = sum(os.path.getsize(p) for p in tree.stdout.decode().split("\0") if p and os.path.isfile(p))
limit = 64 * 2**20 - 2 * 2**20  # 2 MiB of headroom for files written meanwhile
if (carry / "cache").exists():
    shutil.rmtree(carry / "cache")
total = base
print(f"working tree without the carry: {base / 2**20:.1f} MiB; limit 64 MiB")
for name, files in sorted(groups.items(), key=lambda kv: sum(p.stat().st_size for p in kv[1])):
    size = sum(p.stat().st_size for p in files)
    fits = total + size <= limit
    print(f"  {name:28s} {size / 2**20:6.1f} MiB in {len(files):3d} files: {'carried' if fits else 'does NOT fit'}")
    if fits:
        total += size
        for p in files:
            dest = carry / "cache" / p.relative_to(root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dest)
print(f"carry folder {carry}: {(total - base) / 2**20:.1f} MiB; tree with it {total / 2**20:.1f} MiB")
EOF
fi

# ---- mode, steps, limits ----
cuda=0
if [ "$force_cpu" = 0 ] && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  cuda=1
fi
if [ "$cuda" = 1 ]; then mode=gpu dev=cuda; else mode=cpu-fallback dev=cpu; fi

if [ -n "$steps_arg" ]; then
  steps="setup"
  for s in ${steps_arg//,/ }; do
    case " $ALL_STEPS " in
      *" $s "*) [ "$s" = setup ] || steps="$steps $s" ;;
      *) echo "gpu-check: unknown step '$s' in --steps (known: ${ALL_STEPS// /, })" >&2; exit 2 ;;
    esac
  done
else
  steps=$ALL_STEPS
fi
if [ -n "${GPU_CHECK_FAIL:-}" ] && [[ " $ALL_STEPS " != *" $GPU_CHECK_FAIL "* ]]; then
  echo "gpu-check: GPU_CHECK_FAIL names no step: '$GPU_CHECK_FAIL' (known: ${ALL_STEPS// /, })" >&2
  exit 2
fi

# limit_<step>: seconds on a GPU / on the CPU fallback; faces: sync and parity batch sizes
if [ "$cuda" = 1 ]; then
  declare -A LIMIT=([setup]=90 [sync]=90 [parity]=60 [pytest]=120 [bench]=90 [suite]=150 [bench-full]=150)
  sync_faces=32 parity_faces=32
else
  declare -A LIMIT=([setup]=120 [sync]=180 [parity]=180 [pytest]=180 [bench]=600 [suite]=900 [bench-full]=0)
  sync_faces=4 parity_faces=32
fi
if [ -n "$faces" ]; then
  [[ "$faces" =~ ^[1-9][0-9]*$ ]] || { echo "gpu-check: --faces must be a positive integer, got '$faces'" >&2; exit 2; }
  sync_faces=$faces parity_faces=$faces
fi

declare -A WHAT=(
  [setup]="torch/CUDA, carried wheels, cloakbench itself, its dependencies, the carried cache"
  [sync]="host syncs per step of pgd, fawkes-v1-low, lowkey (SFace, $sync_faces demo faces)"
  [parity]="white-box zoo embeddings of $parity_faces demo faces: $([ $cuda = 1 ] && echo CPU vs CUDA || echo batch vs one at a time, CPU)"
  [pytest]="python -m pytest -m gpu tests/test_gpu.py"
  [bench]="cloakbench bench --device $dev --quick"
  [suite]="cloakbench run facecure-tiny --device $dev (dataset: celeb24)"
  [bench-full]="cloakbench bench --device $dev (if time is left)"
)

if [ "$dry_run" = 1 ]; then
  echo "gpu-check: mode $mode (device $dev); report $report_dir/<UTC date>_$mode.md"
  for s in $steps; do
    printf '  %-10s limit %4ss  %s\n' "$s" "${LIMIT[$s]}" "${WHAT[$s]}"
  done
  exit 0
fi

[ -n "$work" ] || work=$(mktemp -d /tmp/gpu-check.XXXXXX)
mkdir -p "$work" "$report_dir" || exit 2
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
declare -A STATUS=() SECONDS_USED=() DETAIL=()
start_all=$(date +%s)

log() { echo "[gpu-check $(date -u +%H:%M:%S)] $*"; }

# ---- the steps: each runs its commands under `timeout $lim` and sets DETAIL[$step] ----
step_setup() {
  local lim=$1 out=$work/setup
  mkdir -p "$out"
  timeout "$lim" "$PY" -c "import sys, torch; print('python', sys.version.split()[0], sys.executable); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), \
'available', torch.cuda.is_available())" || return 1
  if compgen -G ".whl/*.whl" >/dev/null; then
    log "installing the carried wheels:" .whl/*.whl
    timeout "$lim" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || return 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  local where
  where=$("$PY" -c "import cloakbench, os; print(os.path.dirname(os.path.dirname(os.path.abspath(cloakbench.__file__))))" 2>/dev/null)
  if [ "$where" != "$REPO" ]; then
    log "cloakbench is not importable from $REPO: pip install --no-deps --no-build-isolation --no-index -e ."
    timeout "$lim" "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . \
      || { log "editable install failed; using PYTHONPATH=$REPO"; export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}; }
  fi
  if [ -d "$CARRY/cache" ]; then
    export CLOAKBENCH_CACHE=$REPO/${CARRY#./}/cache CLOAKBENCH_OFFLINE=1
    log "cache: the carried $CLOAKBENCH_CACHE ($(du -sh "$CLOAKBENCH_CACHE" | cut -f1)); CLOAKBENCH_OFFLINE=1"
  fi
  # every declared dependency: installed, and in the declared range? (reported; a missing one fails later steps)
  timeout "$lim" "$PY" - >"$out/deps.txt" 2>&1 <<'EOF'
from importlib import metadata
from packaging.requirements import Requirement
bad = []
for text in metadata.requires("cloakbench") or []:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    try:
        have = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        bad.append(f"{req} (missing)")
        continue
    if have not in req.specifier:
        bad.append(f"{req} (have {have})")
print("dependencies not met: " + ("; ".join(bad) if bad else "none"))
EOF
  cat "$out/deps.txt"
  DETAIL[setup]=$(tail -1 "$out/deps.txt")
  timeout "$lim" "$PY" -c "import cloakbench.cli" || return 1
}

step_sync() {
  timeout "$1" "$PY" scripts/gpu_sync_check.py sync --device "$dev" --faces "$sync_faces" --out "$work/sync"
}

step_parity() {
  timeout "$1" "$PY" scripts/gpu_sync_check.py parity --device "$dev" --faces "$parity_faces" --out "$work/parity"
}

step_pytest() {
  local rc=0
  timeout "$1" "$PY" -m pytest -m gpu -q -p no:cacheprovider -o addopts="-ra" tests/test_gpu.py || rc=$?
  if [ "$cuda" = 0 ] && [ "$rc" = 0 ]; then
    DETAIL[pytest]="skipped: no CUDA, every gpu test skips (they ran and said so; see the log)"
    return 3
  fi
  return "$rc"
}

step_bench() {
  timeout "$1" "$PY" -m cloakbench.cli bench --device "$dev" --quick --quiet --out "$work/bench"
}

step_bench-full() {
  timeout "$1" "$PY" -m cloakbench.cli bench --device "$dev" --quiet --out "$work/bench-full"
}

step_suite() {
  local data="" candidate
  for candidate in "$CARRY/celeb24" "${CLOAKBENCH_CELEB24:-}" "$REPO/../shared/datasets/celeb24"; do
    if [ -n "$candidate" ] && [ -d "$candidate" ]; then data=$(cd "$candidate" && pwd); break; fi
  done
  if [ -z "$data" ]; then
    DETAIL[suite]="skipped: celeb24 not found ($CARRY/celeb24, \$CLOAKBENCH_CELEB24, ../shared/datasets/celeb24)"
    return 3
  fi
  # the built-in suite as it is, its dataset path pointed at the folder found (the suite file names a relative one)
  local rc=0
  timeout 60 "$PY" - "$data" "$work/facecure-tiny.yaml" <<'EOF' || rc=$?
import sys, yaml
from importlib import resources
from cloakbench.attacks.recognizers import RECOGNIZERS
from cloakbench.errors import FetchError
suite = yaml.safe_load(resources.files("cloakbench.suites").joinpath("facecure-tiny.yaml").read_text())
suite["dataset"]["path"] = sys.argv[1]
names = set(suite["recognizers"]) | {s for d in suite["defenses"] for s in d.get("surrogates", [])}
for name in sorted(names):
    try:
        RECOGNIZERS.create(name)
    except FetchError as exc:
        print(f"skipped: {name}'s weights are not in the cache ({str(exc).splitlines()[0][:120]})")
        sys.exit(3)
with open(sys.argv[2], "w") as fh:
    yaml.safe_dump(suite, fh, sort_keys=False)
EOF
  [ "$rc" = 0 ] || return "$rc"
  timeout "$1" "$PY" -m cloakbench.cli run "$work/facecure-tiny.yaml" --device "$dev" --quiet --fresh --out "$work/suite"
}

run_step() {
  local step=$1 lim=${LIMIT[$1]} t0 rc=0 elapsed left
  elapsed=$(($(date +%s) - start_all))
  if [ "$cuda" = 1 ] && [ "$step" != setup ]; then
    left=$((BUDGET_S - elapsed))
    [ "$lim" -le "$left" ] || lim=$left
  fi
  if [ "$lim" -lt 20 ]; then
    STATUS[$step]=skipped SECONDS_USED[$step]=0
    DETAIL[$step]=$([ "${LIMIT[$step]}" = 0 ] && echo "not run on the CPU fallback (too long)" || echo "no time left")
    log "$step: ${DETAIL[$step]}"
    return
  fi
  log "$step (limit ${lim}s): ${WHAT[$step]}"
  t0=$(date +%s)
  if [ "${GPU_CHECK_FAIL:-}" = "$step" ]; then
    echo "failing on purpose: GPU_CHECK_FAIL=$step" >"$work/$step.log"
    DETAIL[$step]="failed on purpose (GPU_CHECK_FAIL=$step)"
    rc=1
  else
    "step_$step" "$lim" >"$work/$step.log" 2>&1 || rc=$?
  fi
  SECONDS_USED[$step]=$(($(date +%s) - t0))
  case "$rc" in
    0) STATUS[$step]=passed ;;
    3) STATUS[$step]=skipped; DETAIL[$step]=${DETAIL[$step]:-$(grep '^skipped' "$work/$step.log" | tail -1)} ;;
    124 | 137) STATUS[$step]=failed; DETAIL[$step]="timed out after ${lim}s" ;;
    *) STATUS[$step]=failed; DETAIL[$step]=${DETAIL[$step]:-"exit code $rc"} ;;
  esac
  log "$step: ${STATUS[$step]} in ${SECONDS_USED[$step]}s ${DETAIL[$step]:-}"
}

# setup runs in this shell (it exports PYTHONPATH and the cache); its log is written afterwards
log "mode $mode; work folder $work"
for s in $steps; do
  if [ "$s" = setup ]; then
    t0=$(date +%s) rc=0
    if [ "${GPU_CHECK_FAIL:-}" = setup ]; then
      DETAIL[setup]="failed on purpose (GPU_CHECK_FAIL=setup)"; rc=1
      echo "failing on purpose" >"$work/setup.log"
    else
      step_setup "${LIMIT[setup]}" >"$work/setup.log" 2>&1 || rc=$?
    fi
    SECONDS_USED[setup]=$(($(date +%s) - t0))
    if [ "$rc" = 0 ]; then STATUS[setup]=passed; else STATUS[setup]=failed; fi
    log "setup: ${STATUS[setup]} in ${SECONDS_USED[setup]}s ${DETAIL[setup]:-}"
  else
    run_step "$s"
  fi
done

# ---- the report ----
day=$(date -u +%Y-%m-%d)
report=$report_dir/${day}_$mode.md
{
  if [ "$cuda" = 1 ]; then
    echo "# cloakbench GPU check, $day"
  else
    echo "# cloakbench GPU check: CPU FALLBACK (no CUDA device was used), $day"
    echo
    echo "**CPU fallback**: torch saw no CUDA device$([ $force_cpu = 1 ] && echo ' (or --cpu was given)'); the steps ran on the"
    echo "CPU at reduced sizes. Nothing below is a GPU number."
  fi
  echo
  echo "Written by \`bash scripts/gpu-check.sh${steps_arg:+ --steps $steps_arg}$([ $force_cpu = 1 ] && echo ' --cpu')\`"
  echo "(commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ', uncommitted changes')),"
  echo "$(date -u +%H:%M:%S) UTC, $(($(date +%s) - start_all)) s in all."
  echo
  echo '```'
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | sed 's/^/nvidia-smi: /'
  else
    echo "nvidia-smi: not found"
  fi
  "$PY" -c "import platform, torch; print('python', platform.python_version(), '| torch', torch.__version__, \
'| CUDA', torch.version.cuda, '| cuDNN', torch.backends.cudnn.version(), '| device', \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none', '| TF32 matmul', \
torch.backends.cuda.matmul.allow_tf32, '| TF32 cuDNN', torch.backends.cudnn.allow_tf32, '| CPU threads', \
torch.get_num_threads())" 2>&1
  echo "cache: ${CLOAKBENCH_CACHE:-default} | offline: ${CLOAKBENCH_OFFLINE:-no}"
  echo '```'
  echo
  echo "| step | status | seconds | limit (s) | what | detail |"
  echo "| --- | --- | --- | --- | --- | --- |"
  for s in $steps; do
    echo "| $s | ${STATUS[$s]:-not run} | ${SECONDS_USED[$s]:-} | ${LIMIT[$s]} | ${WHAT[$s]} | ${DETAIL[$s]:-} |"
  done
  for s in $steps; do
    echo
    echo "## $s: ${STATUS[$s]:-not run}"
    echo
    case "$s" in
      sync | parity) [ -f "$work/$s/$s.md" ] && cat "$work/$s/$s.md" ;;
      bench | bench-full) [ -f "$work/$s/bench.md" ] && cat "$work/$s/bench.md" ;;
      suite) [ -f "$work/suite/summary.md" ] && cat "$work/suite/summary.md" ;;
    esac
    if [ "${STATUS[$s]:-}" != passed ] || [ "$s" = setup ]; then
      echo
      echo "Last lines of its log:"
      echo
      echo '```'
      [ -f "$work/$s.log" ] && tail -n 25 "$work/$s.log" | cut -c1-300
      echo '```'
    fi
  done
} >"$report"
log "report: $report"

failed=0
for s in $steps; do [ "${STATUS[$s]:-}" != failed ] || failed=1; done
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT" && cp "$report" "$OUT/"
  tar -czf "$OUT/gpu-check-logs.tar.gz" -C "$work" . 2>/dev/null || true
fi
exit "$failed"
