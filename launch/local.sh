#!/usr/bin/env bash
# Train a config on this machine, then sample a prompt file from the finished run.
#
#   launch/local.sh CONFIG WORKDIR [PROMPTS] [-- --config.train.steps=100 ...]
#   launch/local.sh configs/shapes.py runs/shapes prompts.txt
#
# Rerunning with the same WORKDIR resumes from its latest checkpoint. Pass
# NUM_DEVICES=8 to emulate an 8-device mesh on the CPU.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,9p' "$0"; exit 2
fi
config=$1; workdir=$2; shift 2
prompts=""
if [[ $# -gt 0 && $1 != "--" ]]; then prompts=$1; shift; fi
if [[ $# -gt 0 && $1 == "--" ]]; then shift; fi
if [[ -n ${NUM_DEVICES:-} ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${NUM_DEVICES}"
fi
cd "$(dirname "$0")/.."
python -m nextstep_jax.cli.train --config "$config" --workdir "$workdir" "$@"
if [[ -n $prompts ]]; then
  python -m nextstep_jax.cli.sample --workdir "$workdir" --prompts "$prompts" --out "$workdir/samples_cli"
fi
