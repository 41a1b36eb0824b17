#!/usr/bin/env bash
# Times `make demo` as a new user meets it: a clean clone, then the set-up (venv, torch, one compile of the
# extension: `make setup`), the demo itself (`make demo`, set-up already done) and the smoke run
# (`lowbit demo --quick`), each on its own clock. Writes bench/results/make_demo_time.md in the checkout it was
# started from, with the CPU, the load average before and after (other jobs on the machine slow every phase) and
# the commit.
#
# Usage, from the repository root:  bash tools/time_make_demo.sh [CLONE_DIR]   (PYTHON picks the base interpreter)
set -euo pipefail

repo="$(git rev-parse --show-toplevel)"
clone="${1:-$(mktemp -d)/lowbit}"
out="$repo/bench/results/make_demo_time.md"
git clone -q "$repo" "$clone"
cd "$clone"
commit="$(git rev-parse --short HEAD)"
cpu="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"

start=$(date +%s.%N)
make setup PYTHON="${PYTHON:-python3}" > setup.log 2>&1
mid=$(date +%s.%N)
make demo > demo.log 2>&1
end=$(date +%s.%N)
.venv/bin/lowbit demo --quick --no-progress --out quick-results > quick.log 2>&1
quick_end=$(date +%s.%N)
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"

setup_s=$(python3 -c "print(f'{$mid - $start:.0f}')")
demo_s=$(python3 -c "print(f'{$end - $mid:.0f}')")
total_s=$(python3 -c "print(f'{$end - $start:.0f}')")
quick_s=$(python3 -c "print(f'{$quick_end - $end:.0f}')")
cat > "$out" <<MD
# make demo from a clean clone

\`bash tools/time_make_demo.sh\` at commit $commit on $cpu ($(nproc) CPUs), $(date -u +%Y-%m-%d).
Load average (1, 5, 15 min) before: $load_before; after: $load_after.

| phase | seconds |
|---|---:|
| set-up (\`make setup\`: venv, torch, the extension compiled once) | $setup_s |
| the demo (\`make demo\` after the set-up) | $demo_s |
| total | $total_s |
| the smoke run (\`lowbit demo --quick\`, after the demo; not in the total) | $quick_s |
MD
echo "wrote $out"
