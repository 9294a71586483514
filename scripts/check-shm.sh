#!/usr/bin/env bash
# Fails if a test left a shared-memory object of ours behind.
left=$(ls /dev/shm 2>/dev/null | grep -E '^(mempool|shmpool|notapool)' || true)
if [ -n "$left" ]; then
  echo "left in /dev/shm: $left" >&2
  exit 1
fi
