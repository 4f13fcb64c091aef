#!/usr/bin/env bash
# Proves that projectionist's rusqlite range (a) links beside sqlx 0.8 and 0.9 in
# one build (only one libsqlite3-sys may be linked) and (b) passes the core tests
# at the low end of the range, rusqlite 0.32 (the lock file pins the high end).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$root/target/sqlite-compat"
mkdir -p "$work"

for sqlx in 0.8 0.9; do
  app="$work/app-sqlx-$sqlx"
  mkdir -p "$app/src"
  echo 'fn main() {}' > "$app/src/main.rs"
  cat > "$app/Cargo.toml" <<TOML
[package]
name = "app-sqlx-${sqlx/./-}"
version = "0.0.0"
edition = "2024"
publish = false

[dependencies]
projectionist = { path = "$root/crates/projectionist" }
sqlx = { version = "$sqlx", default-features = false, features = ["sqlite", "runtime-tokio"] }

[workspace]
TOML
  (cd "$app" && rm -f Cargo.lock && cargo generate-lockfile -q)
  versions="$(cd "$app" && cargo tree -q -i libsqlite3-sys --depth 0 -e normal | head -n 1)"
  rusqlite="$(cd "$app" && cargo tree -q -i rusqlite --depth 0 | head -n 1)"
  echo "sqlx $sqlx: resolves with $rusqlite and $versions"
done

# The low end of the range: rebuild the core crate's tests against rusqlite 0.32.
low="$work/low-end"
rm -rf "$low" && mkdir -p "$low"
cp -r "$root/Cargo.toml" "$root/Cargo.lock" "$root/crates" "$root/examples" "$low/"
(cd "$low" && cargo update -q -p rusqlite --precise 0.32.1 \
  && cargo tree -q -i rusqlite --depth 0 | head -n 1 \
  && CARGO_TARGET_DIR="$work/target-low" cargo test -q -p projectionist --tests 2>&1 | grep -E "test result|passed|FAILED|error" )
