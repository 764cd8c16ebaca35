#!/usr/bin/env bash
# Create a TPU VM slice, install this repository on every worker, train a config on all of them.
#
#   launch/tpu_pod.sh --name NAME --zone ZONE --type ACCELERATOR --config FILE[:variant] --workdir gs://BUCKET/DIR \
#       [--project PROJECT] [--version RUNTIME] [--spot | --queued [--spot]] [--no-create] [--dry-run] \
#       [--config.train.steps=100 ...] [-- more overrides]
#
#   launch/tpu_pod.sh --name ns-large --zone us-east5-a --type v5p-128 \
#       --config configs/nextstep1_large.py --workdir gs://my-bucket/runs/large --queued --spot
#
# Steps: (1) create the slice (tpu-vm create, or a queued resource with --queued, waiting until it
# is ACTIVE; --spot for preemptible capacity; --no-create reuses an existing slice), (2) copy the
# repository (git archive of HEAD) to every worker and pip install it with jax[tpu] and GCS
# support, (3) run nextstep-train on every worker (--worker=all). jax.distributed.initialize needs no
# flags on a slice. Checkpoints and host files (config.json, metrics.jsonl, samples, tb/) go to
# the gs:// workdir; each worker's log goes to ~/train.log on that worker. A preempted or
# maintained job checkpoints one agreed step on SIGTERM and exits 0: rerun the same command with
# --no-create (or on a new slice) to continue. --dry-run prints the gcloud commands only.
# The command that deletes the slice is printed at the end.
set -euo pipefail

usage() { sed -n '2,21p' "$0"; exit 2; }
name="" zone="" type="" config="" workdir="" project="" version="tpu-ubuntu2204-base"
spot=0 queued=0 create=1 dry_run=0
config_overrides=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) name=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --type) type=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --workdir) workdir=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --spot) spot=1; shift ;;
    --queued) queued=1; shift ;;
    --no-create) create=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    --config.*) config_overrides+=("$1"); shift ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "unknown argument $1 (config overrides look like --config.train.steps=100)" >&2; usage ;;
  esac
done
for required in name zone config workdir; do
  if [[ -z ${!required} ]]; then echo "--$required is required" >&2; usage; fi
done
if [[ $create == 1 && -z $type ]]; then echo "--type (e.g. v5p-64) is required to create a slice" >&2; usage; fi
if [[ $workdir != gs://* ]]; then
  echo "warning: --workdir $workdir is not a gs:// URL; every worker must see the same checkpoints" >&2
fi

project_flag=()
if [[ -n $project ]]; then project_flag=(--project "$project"); fi
spot_flag=()
if [[ $spot == 1 ]]; then spot_flag=(--spot); fi
overrides=""
for override in "${config_overrides[@]}" "$@"; do overrides+=" $(printf '%q' "$override")"; done

run() {  # Prints, then runs unless --dry-run.
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ $dry_run == 0 ]]; then "$@"; fi
}

tpu=(gcloud compute tpus tpu-vm)
if [[ $create == 1 ]]; then
  if [[ $queued == 1 ]]; then
    run gcloud compute tpus queued-resources create "$name" --node-id "$name" --zone "$zone" \
      --accelerator-type "$type" --runtime-version "$version" "${spot_flag[@]}" "${project_flag[@]}"
    if [[ $dry_run == 0 ]]; then
      until [[ $(gcloud compute tpus queued-resources describe "$name" --zone "$zone" "${project_flag[@]}" \
                 --format='value(state.state)') == ACTIVE ]]; do
        echo "waiting for queued resource $name to become ACTIVE..."; sleep 60
      done
    fi
  else
    run "${tpu[@]}" create "$name" --zone "$zone" --accelerator-type "$type" --version "$version" \
      "${spot_flag[@]}" "${project_flag[@]}"
  fi
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
archive=$(mktemp -t nextstep-jax-XXXXXX.tar.gz)
git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
run "${tpu[@]}" scp "$archive" "$name:~/nextstep-jax.tar.gz" --zone "$zone" --worker=all "${project_flag[@]}"
run "${tpu[@]}" ssh "$name" --zone "$zone" --worker=all "${project_flag[@]}" --command \
  "rm -rf ~/nextstep-jax && mkdir -p ~/nextstep-jax && tar -xzf ~/nextstep-jax.tar.gz -C ~/nextstep-jax \
   && cd ~/nextstep-jax && python3 -m pip install -q -e '.[tpu,gcs]'"
rm -f "$archive"
run "${tpu[@]}" ssh "$name" --zone "$zone" --worker=all "${project_flag[@]}" --command \
  "cd ~/nextstep-jax && python3 -m nextstep_jax.cli.train --config $config --workdir $workdir$overrides 2>&1 | tee -a ~/train.log"

echo "workdir: $workdir   (sample: nextstep-sample --workdir $workdir --prompts FILE --out DIR)"
if [[ $queued == 1 ]]; then
  echo "delete the slice: gcloud compute tpus queued-resources delete $name --zone $zone --force ${project_flag[*]}"
else
  echo "delete the slice: gcloud compute tpus tpu-vm delete $name --zone $zone ${project_flag[*]}"
fi
