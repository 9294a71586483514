#!/usr/bin/env bash
# `check-shm.sh snapshot FILE` records /dev/shm; `check-shm.sh compare FILE`
# fails if a shared-memory object of ours (mempool*, shmpool*, notapool*)
# appeared since: tests must clean up, even when they fail.
set -euo pipefail
list() { ls /dev/shm 2>/dev/null | grep -E '^(mempool|shmpool|notapool)' | sort || true; }
case "${1:-}" in
  snapshot) list > "$2" ;;
  compare)
    new=$(list | comm -13 "$2" - || true)
    if [ -n "$new" ]; then
      echo "left in /dev/shm by the tests: $new" >&2
      exit 1
    fi ;;
  *) echo "usage: $0 snapshot|compare FILE" >&2; exit 2 ;;
esac
