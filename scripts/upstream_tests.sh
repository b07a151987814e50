#!/usr/bin/env bash
# Run upstream's own tests, from the source of the line installed in $VENV (default .venv), against that
# patched install:
#   bash scripts/upstream_tests.sh         the CI selection of that line (below)
#   bash scripts/upstream_tests.sh --all   every test of the selection's files that needs no network
# Every line: tests/test_wds.py (the patched get_wds_dataset: 0004, 0005).
#   Left to --all: test_training_simple.py. Its test_training (RN50 through main(): 6 min on 2 CPU cores on
#   3.x, 4.5 on main) runs the hook call sites with the plugin inert, as this project's
#   tests/test_training_e2e.py::test_without_robust_loss_nothing_changes (3.x) and
#   tests/main/...::test_without_robust_loss_upstream_builds_its_own_task do on a tiny model in seconds;
#   test_training_coca, _unfreezing_vit, _clip_with_jit train full-size models (5-8 minutes apiece) and
#   run no line of the patches that test_training does not.
#   Never run: test_training_mt5 (downloads google/mt5-base's tokenizer from the Hugging Face hub).
# main also: the unit tests of what patches/main touches (task checkpoints, create_task,
#   the optimizer's param groups, parse_args, the task base class), less one that needs the network.
# Denormal flushing is switched on for the process (CPU steps run 3-4x slower without it);
# upstream's test files run as they are. Archives of v3/main are found as set-up finds them
# ($OPENCLIP_UPSTREAM_SOURCES, .cache/upstream/, shared/upstream/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(cd "${VENV:-.venv}" && pwd)/bin/python"
LINE="$("$PY" -c 'from open_clip_train._patch_digest import LINE; print(LINE)' 2>/dev/null || echo release)"
SRC="$("$PY" -c 'import sys; sys.path.insert(0, "scripts"); import install
try:
    print(install.pinned_file(install.read_pin(line=sys.argv[1])))
except install.SetupError as e:
    sys.exit(f"upstream_tests.sh: {e}")' "$LINE")"
DEST=".cache/upstream/tests-$LINE"
SELECT=(tests/test_wds.py)
DESELECT=()
if [ "$LINE" = "main" ]; then
  SELECT+=(tests/test_task_checkpoint.py tests/test_factory_task.py tests/test_optim_layer_decay.py
           tests/test_params.py tests/test_task_base_unit.py)
  # needs the Hugging Face hub (naflexclap_little_roberta's text config)
  DESELECT=(--deselect tests/test_optim_layer_decay.py::test_create_optimizer_unwrap_preserves_name_matching)
fi
if [ "${1:-}" = "--all" ]; then
  shift
  SELECT=("${SELECT[@]%%::*}" tests/test_training_simple.py -k "not mt5")
fi
echo "upstream tests of line $LINE, from $SRC"
rm -rf "$DEST" && mkdir -p "$DEST"
tar -xzf "$SRC" -C "$DEST" --strip-components=1 --wildcards '*/tests/*'
cd "$DEST"
HF_HUB_OFFLINE=1 "$PY" -c '
import sys, torch, pytest
torch.set_flush_denormal(True)
sys.exit(pytest.main(sys.argv[1:]))' -q -p no:cacheprovider --rootdir=. "${SELECT[@]}" ${DESELECT[@]+"${DESELECT[@]}"} "$@"
