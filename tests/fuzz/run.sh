#!/usr/bin/env bash
# Builds the fuzz targets with LLVM's sanitizer-coverage pass (stable rustc:
# `-C passes` and `-C llvm-args`; `--target` keeps the flags off build
# scripts) and runs each target.
#
#   run.sh SECONDS      each target for SECONDS (random seed), its corpus kept
#                       in target/fuzz/corpus/<target> (`make fuzz`)
#   run.sh --runs N     each target for N inputs from seed 1 and the seeds
#                       alone: the same inputs every time (`make test`)
#
# A failing input fails the run and is left in target/fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/../.."
triple="$(rustc -vV | sed -n 's/^host: //p')"
out="$PWD/target/fuzz"
if [ "${1:-}" = "--runs" ]; then
	limit="-runs=${2:-100000} -seed=1"
	corpus="$(mktemp -d)"
	trap 'rm -rf "$corpus"' EXIT
else
	limit="-max_total_time=${1:-300}"
	corpus="$out/corpus"
fi
flags="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4"
flags="$flags -Cllvm-args=-sanitizer-coverage-inline-8bit-counters"
flags="$flags -Cllvm-args=-sanitizer-coverage-pc-table"
flags="$flags -Cllvm-args=-sanitizer-coverage-trace-compares"
flags="$flags --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
RUSTFLAGS="$flags" cargo build --release --quiet --target "$triple" \
	--manifest-path tests/fuzz/Cargo.toml --target-dir "$out/build"
for t in netconf definitions annotation cni_args results; do
	mkdir -p "$corpus/$t" "$out/artifacts/$t"
	echo "fuzz $t: $limit"
	# shellcheck disable=SC2086
	"$out/build/$triple/release/$t" $limit -timeout=10 -rss_limit_mb=2048 \
		-print_final_stats=1 -artifact_prefix="$out/artifacts/$t/" \
		"$corpus/$t" "tests/fuzz/seeds/$t" 2>&1 |
		grep -E "^(Done|stat::new_units_added)|ERROR|panicked|SUMMARY|deadly signal" || true
	if ls "$out/artifacts/$t"/crash-* "$out/artifacts/$t"/timeout-* "$out/artifacts/$t"/oom-* >/dev/null 2>&1; then
		echo "fuzz $t: a failing input, in $out/artifacts/$t/" >&2
		exit 1
	fi
done
