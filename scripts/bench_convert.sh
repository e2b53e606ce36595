#!/usr/bin/env bash
# Reproducible benchmark of `bitnet-pack convert` on a synthetic BitNet b1.58 2B4T-shaped bf16
# checkpoint (examples/synth_checkpoint.rs, ~4.8 GB).
#
#   scripts/bench_convert.sh [WORKDIR]        (default: /tmp/bitnet-pack-bench; needs ~6 GB free)
#
# Environment:
#   LAYERS=N          generate a smaller model (default 30, the real 2B4T) for a quick run;
#   SHARDS=N          split the checkpoint into N shard files with a model.safetensors.index.json
#                     (default 1: one model.safetensors), as transformers saves large models;
#   RUNS=N            time each thread setting N times and report the fastest run (default 1;
#                     use 2-3 on a machine that is not idle);
#   BITNET_PACK=PATH  benchmark this binary instead of building the repo's (e.g. a build of a
#                     given commit: `git archive <rev> | tar -x -C DIR && cargo build --release`).
#
# What it does:
#   1. builds the release binary (unless BITNET_PACK is set), and the generator if needed;
#   2. generates WORKDIR/ckpt-L<LAYERS>/ if it is not there yet (kept for later runs);
#   3. warms the page cache with the input, and runs one untimed conversion to learn the output
#      size;
#   4. measures the floor = (a) reading the input once from the page cache (`cat`, best of 3)
#      + (b) writing a file of the output's size through the page cache (`dd`, no fdatasync,
#      best of 3);
#   5. times `bitnet-pack convert --force --quiet` with the default thread count, --threads 1
#      and --threads 2 under GNU time, and checks that the outputs are byte-identical;
#   6. prints a markdown table (for docs/benchmarks.md) and the machine description; the same
#      report is saved to WORKDIR/results.md. When the binary has `convert --timings`, every
#      timed run passes it, and the per-stage breakdown of each row's fastest run is appended.
#
# `sync` runs (untimed) before every timed step so that each one starts without dirty pages
# left over from the previous one; the page cache itself is never dropped (warm-cache numbers).
set -euo pipefail

WORKDIR=${1:-/tmp/bitnet-pack-bench}
LAYERS=${LAYERS:-30}
SHARDS=${SHARDS:-1}
RUNS=${RUNS:-1}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${BITNET_PACK:-$REPO/target/release/bitnet-pack}
GEN=$REPO/target/release/examples/synth_checkpoint
# Largest tensor of the model: the embedding, 128256 x 2560 (independent of LAYERS).
LARGEST_F32=$((128256 * 2560 * 4))

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 2; }
now() { date +%s.%N; }
# calc EXPR: floating-point arithmetic with awk.
calc() { awk "BEGIN { printf \"%s\", $1 }"; }
min() { printf '%s\n' "$@" | sort -g | head -1; }
# Busy (non-idle, non-iowait) CPU ticks of the whole machine, from /proc/stat.
busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }
HZ=$(getconf CLK_TCK)

case $SHARDS in ''|*[!0-9]*|0) die "SHARDS must be a positive whole number, not '$SHARDS'" ;; esac
mkdir -p "$WORKDIR"
WORKDIR=$(cd "$WORKDIR" && pwd)
if [ "$SHARDS" = 1 ]; then
    CKPT=$WORKDIR/ckpt-L$LAYERS
    MARKER=$CKPT/model.safetensors
else
    CKPT=$WORKDIR/ckpt-L$LAYERS-s$SHARDS
    MARKER=$CKPT/model.safetensors.index.json
fi
# The weight files of the checkpoint (after it is generated).
inputs() {
    if [ "$SHARDS" = 1 ]; then
        printf '%s\n' "$CKPT/model.safetensors"
    else
        for i in $(seq 1 "$SHARDS"); do printf '%s/model-%05d-of-%05d.safetensors\n' "$CKPT" "$i" "$SHARDS"; done
    fi
}

# --- prerequisites -------------------------------------------------------------------------
if ! /usr/bin/time -v true >/dev/null 2>&1; then
    log "GNU time not found; installing it (apt-get install -y time)"
    if [ "$(id -u)" = 0 ]; then apt-get install -y time >&2; else sudo apt-get install -y time >&2; fi
fi
avail_kb=$(df -Pk "$WORKDIR" | awk 'NR == 2 { print $4 }')
need_kb=$((3 * 1024 * 1024))              # three outputs + the floor file, ~1.2 GB each
[ -f "$MARKER" ] || need_kb=$((need_kb + 5 * 1024 * 1024))
if [ "$avail_kb" -lt "$need_kb" ]; then
    log "warning: only $((avail_kb / 1024)) MiB free in $WORKDIR, about $((need_kb / 1024)) MiB needed"
fi

# --- build ---------------------------------------------------------------------------------
if [ -z "${BITNET_PACK:-}" ]; then
    log "building (cargo build --release --bin bitnet-pack)"
    (cd "$REPO" && cargo build --release --quiet --bin bitnet-pack)
fi
[ -x "$BIN" ] || die "no executable at $BIN"

# --- input ---------------------------------------------------------------------------------
# The index is written last, so its presence means every shard was written.
if [ -f "$MARKER" ] && [ -f "$CKPT/config.json" ]; then
    log "reusing $CKPT"
else
    log "building the generator (cargo build --release --example synth_checkpoint)"
    (cd "$REPO" && cargo build --release --quiet --example synth_checkpoint)
    log "generating the synthetic checkpoint into $CKPT"
    "$GEN" "$CKPT" --layers "$LAYERS" --shards "$SHARDS" >&2
fi
mapfile -t INPUTS < <(inputs)
for f in "${INPUTS[@]}"; do [ -f "$f" ] || die "missing $f (delete $CKPT to generate it again)"; done
IN_BYTES=$(stat -c %s "${INPUTS[@]}" | awk '{ s += $1 } END { printf "%.0f\n", s }')

log "warming the page cache"
cat "${INPUTS[@]}" >/dev/null

# One untimed conversion: learns the output size and warms the binary.
log "untimed first conversion"
sync
"$BIN" convert "$CKPT" -o "$WORKDIR/out-default.bpk" --force --quiet
OUT_BYTES=$(stat -c %s "$WORKDIR/out-default.bpk")

# --- floor ---------------------------------------------------------------------------------
log "floor (a): read the input from the page cache, best of 3"
reads=()
for _ in 1 2 3; do
    sync
    t0=$(now); cat "${INPUTS[@]}" >/dev/null; t1=$(now)
    reads+=("$(calc "$t1 - $t0")")
done
READ_S=$(min "${reads[@]}")

log "floor (b): write $OUT_BYTES bytes through the page cache (dd), best of 3"
writes=()
for _ in 1 2 3; do
    rm -f "$WORKDIR/floor.out"
    sync
    t0=$(now)
    dd if=/dev/zero of="$WORKDIR/floor.out" bs=8M count="$OUT_BYTES" iflag=count_bytes status=none
    t1=$(now)
    writes+=("$(calc "$t1 - $t0")")
done
rm -f "$WORKDIR/floor.out"
WRITE_S=$(min "${writes[@]}")
FLOOR_S=$(calc "$READ_S + $WRITE_S")
log "floor: read ${READ_S}s (all: ${reads[*]}) + write ${WRITE_S}s (all: ${writes[*]}) = ${FLOOR_S}s"

# --- timed conversions ---------------------------------------------------------------------
# elapsed "h:mm:ss" or "m:ss.ss" -> seconds
to_secs() { awk -F: '{ s = 0; for (i = 1; i <= NF; i++) s = s * 60 + $i; printf "%.2f", s }' <<<"$1"; }
field() { sed -n "s/^[[:space:]]*$1: //p" "$2"; }

RSS_TARGET_KB=$(( (LARGEST_F32 * 3 / 2 + 200 * 1024 * 1024) / 1024 ))
TIMINGS=()
"$BIN" convert --help 2>/dev/null | grep -q -- '--timings' && TIMINGS=(--timings)
rows=()
breakdowns=()
declare -A SHA
for label in default 1 2; do
    out=$WORKDIR/out-$label.bpk
    args=()
    [ "$label" = default ] || args=(--threads "$label")
    best=""
    max_rss_kb=0
    for run in $(seq 1 "$RUNS"); do
        log "convert, threads: $label, run $run of $RUNS"
        sync
        tf=$WORKDIR/time-$label-$run.txt
        b0=$(busy_ticks)
        sf=$WORKDIR/stages-$label-$run.txt
        /usr/bin/time -v -o "$tf" "$BIN" convert "$CKPT" -o "$out" --force --quiet "${args[@]}" "${TIMINGS[@]}" 2>"$sf"
        b1=$(busy_ticks)
        wall=$(to_secs "$(field 'Elapsed (wall clock) time (h:mm:ss or m:ss)' "$tf")")
        user=$(field 'User time (seconds)' "$tf")
        sys=$(field 'System time (seconds)' "$tf")
        rss_kb=$(field 'Maximum resident set size (kbytes)' "$tf")
        [ "$rss_kb" -gt "$max_rss_kb" ] && max_rss_kb=$rss_kb
        # CPU time other processes used during the run, in CPUs (0 on an otherwise idle machine).
        others=$(calc "(($b1 - $b0) / $HZ - $user - $sys) / $wall")
        others=$(calc "$others < 0 ? 0 : $others" | xargs printf '%.2f')
        log "threads $label, run $run: wall ${wall}s, user ${user}s, sys ${sys}s, rss ${rss_kb} kB, other processes ${others} CPUs"
        if [ -z "$best" ] || awk "BEGIN { exit !($wall < ${best%% *}) }"; then
            best="$wall $user $sys $others"
            best_stages=$sf
        fi
    done
    read -r wall user sys others <<<"$best"
    SHA[$label]=$(sha256sum "$out" | cut -d' ' -f1)
    threads=$label
    [ "$label" = default ] && threads="default ($(nproc))"
    [ ${#TIMINGS[@]} -gt 0 ] && breakdowns+=("threads $threads, fastest run:" "$(cat "$best_stages")" "")
    rows+=("| $threads | $wall | $(calc "$IN_BYTES / 1e9 / $wall" | xargs printf '%.3f') | $user | $sys | $(calc "$max_rss_kb / 1024" | xargs printf '%.0f') | $(calc "$wall / $FLOOR_S" | xargs printf '%.1f') | $( [ "$max_rss_kb" -le "$RSS_TARGET_KB" ] && echo yes || echo NO ) | $others |")
done

# --- report --------------------------------------------------------------------------------
if [ "${SHA[1]}" = "${SHA[2]}" ] && [ "${SHA[1]}" = "${SHA[default]}" ]; then
    SAME="identical: sha256 ${SHA[1]} (threads 1, 2 and default)"
else
    SAME="DIFFERENT: threads 1 ${SHA[1]}, threads 2 ${SHA[2]}, default ${SHA[default]}"
fi
mem_kb=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)
cpu=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
fs=$(df -PT "$WORKDIR" | awk 'NR == 2 { print $2 }')
if [ -z "${BITNET_PACK:-}" ]; then
    commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
    [ -n "$(git -C "$REPO" status --porcelain -- src Cargo.toml 2>/dev/null)" ] && commit="$commit + uncommitted changes"
    binary="$("$BIN" --version) built from $commit"
else
    binary="$("$BIN" --version) ($BIN)"
fi

LOAD_NOTE=""
[ "$(cut -d' ' -f1 /proc/loadavg | cut -d. -f1)" -ge 1 ] && LOAD_NOTE=" (load average at the end: $(cut -d' ' -f1-3 /proc/loadavg))"
BREAKDOWN=""
if [ ${#breakdowns[@]} -gt 0 ]; then
    fence='```'
    BREAKDOWN=$(printf '\nPer-stage breakdown (`--timings`):\n\n%s\n%s\n%s\n' "$fence" "$(printf '%s\n' "${breakdowns[@]}")" "$fence")
fi
report=$(cat <<EOF
### \`bitnet-pack convert\`, synthetic 2B4T-shaped bf16 checkpoint ($LAYERS layers, $SHARDS file(s))

- input: $( [ "$SHARDS" = 1 ] && echo '`model.safetensors`' || echo "$SHARDS shards + \`model.safetensors.index.json\`"), $IN_BYTES bytes ($(calc "$IN_BYTES / 1e9" | xargs printf '%.2f') GB), warm page cache
- output: $OUT_BYTES bytes ($(calc "$OUT_BYTES / 1e9" | xargs printf '%.2f') GB), layout i2, keep source (bf16)
- floor: read input ${READ_S} s (\`cat\`, best of 3) + write output size ${WRITE_S} s (\`dd\` to page cache, best of 3) = **${FLOOR_S} s**
- RSS target: 1.5 x largest tensor in f32 (embedding 128256x2560x4 B) + 200 MiB = $((RSS_TARGET_KB / 1024)) MiB
- outputs: $SAME
- each row: the fastest of $RUNS run(s) (peak RSS: the largest over the runs); "other load" is the CPU time other processes used during that run divided by its wall time: anything well above 0 means the machine was shared and the row is pessimistic${LOAD_NOTE}

| threads | wall s | input GB/s | user s | sys s | peak RSS MiB | wall / floor | RSS <= target | other load (CPUs) |
|---|---|---|---|---|---|---|---|---|
$(printf '%s\n' "${rows[@]}")

${BREAKDOWN}

Machine: $(nproc) CPUs ($cpu), $(calc "$mem_kb / 1024 / 1024" | xargs printf '%.1f') GiB RAM, $fs filesystem, Linux $(uname -r), $(rustc --version 2>/dev/null || echo rustc unknown), $binary, $(date -u +%Y-%m-%d).
EOF
)
printf '%s\n' "$report" | tee "$WORKDIR/results.md"
log "report saved to $WORKDIR/results.md; GNU time outputs in $WORKDIR/time-*-*.txt"
