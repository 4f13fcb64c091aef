#!/usr/bin/env bash
# Variant (c) of the hot-key bench as users build it (examples/user-built: a
# project of its own, default release profile, system allocator, default
# options, serde struct payloads, the log read through `open_mapped`) and the
# declarative path (the bench's (d) child, and `projectionist rebuild` itself
# with the same config and a `[source]` naming the table) against the bench's
# own (c) child (and its `c1`, committing after every batch as a2 does rather
# than every 250 ms) and the hand-written fan-out that decodes each payload once
# (a2: one reader thread, one writer thread per projection, batches of 500, a
# checkpoint row in each batch's transaction), all reading the same events
# from another program's table layout (`stored_events(id, originator,
# position, topic, state)`, copied from the bench's log), runs interleaved
# (A B C ... A B C ...). Prints each run, the medians of wall and CPU seconds
# and the ratios to a2; fails if a digest differs.
#
#   scripts/bench-user-built.sh [EVENTS] [RUNS] [WORK]     (default 1000000 5 target/bench)
#
# With BEFORE_CLI=path/to/an/earlier/projectionist, that binary runs too
# (variant cli-before, same config), to measure a change of the CLI's path.
set -euo pipefail
events=${1:-1000000}
runs=${2:-5}
work=${3:-target/bench}
cd "$(dirname "$0")/.."
cargo build --release -q -p projectionist-bench -p projectionist-cli
cargo build --release -q --manifest-path examples/user-built/Cargo.toml
bin=target/release/projectionist-bench
cli=target/release/projectionist
user=examples/user-built/target/release/user-built
mkdir -p "$work"
# One bench run of (c) makes (or reuses) the hot-key log.
"$bin" rebuild --workload hot --events "$events" --runs 1 --variants c --work "$work" > /dev/null
own=$(ls "$work"/hot-"$events"-seed*.db | grep -v foreign | head -1)
log="${own%.db}-foreign.db"
if [ ! -f "$log" ]; then
  python3 - "$own" "$log" <<'PY'
import sqlite3, sys
own, foreign = sys.argv[1], sys.argv[2]
conn = sqlite3.connect(foreign)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("""CREATE TABLE stored_events (
    id INTEGER PRIMARY KEY, originator TEXT NOT NULL, position INTEGER NOT NULL,
    topic TEXT NOT NULL, state TEXT NOT NULL, UNIQUE (originator, position))""")
conn.execute("ATTACH DATABASE ? AS own", (own,))
conn.execute("""INSERT INTO stored_events
    SELECT sequence, stream_id, stream_version, event_type, data FROM own.events ORDER BY sequence""")
conn.commit()
conn.close()
PY
fi
config="$work/hot-foreign.toml"
"$bin" config --workload hot --foreign-table > "$config"
variants=(bench-a2 bench-c bench-c1 user-built bench-d cli)
if [ -n "${BEFORE_CLI:-}" ]; then
  variants+=(cli-before)
fi
median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
: > "$work/user-built.times"
for run in $(seq "$runs"); do
  for variant in "${variants[@]}"; do
    dir="$work/ub-$variant"
    rm -rf "$dir"
    case "$variant" in
      bench-*) cmd=("$bin" run --variant "${variant#bench-}" --workload hot --foreign-table --bench-store "$log" --bench-dir "$dir") ;;
      user-built) cmd=("$user" "$log" "$dir" foreign) ;;
      cli) cmd=("$cli" rebuild --quiet --store "$log" --config "$config" --dir "$dir") ;;
      cli-before) cmd=("$BEFORE_CLI" rebuild --quiet --store "$log" --config "$config" --dir "$dir") ;;
    esac
    out=$( { /usr/bin/time -f "TIME %e %U %S" "${cmd[@]}"; } 2>&1 )
    if [[ "$variant" == cli* ]]; then
      digest=$("$bin" digest --bench-dir "$dir")
    else
      digest=$(echo "$out" | sed -n 's/.*"digest":"\([0-9a-f]*\)".*/\1/p')
    fi
    read -r wall user_s sys_s < <(echo "$out" | sed -n 's/^TIME //p')
    cpu=$(echo "$user_s + $sys_s" | bc)
    echo "run $run $variant: wall $wall s, cpu $cpu s, digest $digest"
    echo "$variant $wall $cpu $digest" >> "$work/user-built.times"
  done
done
reference=$(awk '$1 == "bench-a2" {print $4; exit}' "$work/user-built.times")
if awk -v r="$reference" '$4 != r {bad=1} END {exit !bad}' "$work/user-built.times"; then
  echo "digests differ" >&2
  exit 1
fi
for variant in "${variants[@]}"; do
  wall=$(awk -v v="$variant" '$1 == v {print $2}' "$work/user-built.times" | median)
  cpu=$(awk -v v="$variant" '$1 == v {print $3}' "$work/user-built.times" | median)
  echo "$variant: wall median $wall s, cpu median $cpu s ($runs runs, $events events)"
  eval "wall_${variant//-/_}=$wall cpu_${variant//-/_}=$cpu"
done
for variant in "${variants[@]:1}"; do
  variant=${variant//-/_}
  w=$(eval echo "\$wall_$variant"); c=$(eval echo "\$cpu_$variant")
  echo "$variant / bench-a2: wall $(echo "scale=2; $w / $wall_bench_a2" | bc)x, cpu $(echo "scale=2; $c / $cpu_bench_a2" | bc)x"
done
echo "digests: all equal ($reference)"
