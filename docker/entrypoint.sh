#!/usr/bin/env bash
# Entrypoint of the ssm-golf image.
#   reproduce submissions/<folder> [--nproc N] [validator rerun options]
#       re-runs a submission under the rules with the data mounted at /data (or $SSM_GOLF_DATA) and compares
#       with its claims; this container is the sandbox (--network none on docker run), the local backend adds
#       the audit hook, the wall-clock limits and the hard kill.
#   validator ... | builder ...    the two command lines of ssm-golf
#   anything else                   run as given (python, bash, nvidia-smi, ...)
# SSM_GOLF_ENTRYPOINT_DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

data_root="${SSM_GOLF_DATA:-/data}"

run() {
    if [[ "${SSM_GOLF_ENTRYPOINT_DRY_RUN:-0}" == "1" ]]; then
        printf '%q ' "$@"
        printf '\n'
        exit 0
    fi
    exec "$@"
}

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
}

command="${1:-help}"
case "$command" in
    reproduce)
        shift
        if [[ $# -lt 1 || "$1" == -* ]]; then
            echo "reproduce: give the submission folder first, e.g. reproduce submissions/<folder> --nproc 8" >&2
            exit 2
        fi
        folder="$1"
        shift
        if [[ ! -d "$folder" ]]; then
            echo "reproduce: $folder: no such folder in $(pwd); name one under submissions/ or mount it" >&2
            exit 2
        fi
        if [[ ! -d "$data_root" ]]; then
            echo "reproduce: $data_root is missing; mount the data read-only: -v DATA:$data_root:ro" >&2
            exit 2
        fi
        run validator rerun "$folder" --data "$data_root" --backend local "$@"
        ;;
    help | -h | --help)
        usage
        ;;
    *)
        run "$@"
        ;;
esac
