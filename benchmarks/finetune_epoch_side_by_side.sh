#!/bin/bash
# Old vs new code: the same sentiment fine-tuning run from each of two checkouts at the same
# time, each pinned to its own core with one TensorFlow thread; then again with the cores
# swapped (the two cores need not run alike). Keras' per-epoch lines and the summary line of
# every run are printed at the end.
#   benchmarks/finetune_epoch_side_by_side.sh OLD_CHECKOUT NEW_CHECKOUT [EPOCHS] [FLAGS...]
# e.g. (git worktree add /tmp/wt_old <commit>; data/ of the old checkout linked to this one's)
#   benchmarks/finetune_epoch_side_by_side.sh /tmp/wt_old . 2
set -euo pipefail
old=$(cd "$1" && pwd); new=$(cd "$2" && pwd); epochs=${3:-1}; shift $(( $# < 3 ? $# : 3 ))
logs=$(mktemp -d /tmp/side_by_side_XXXX)
run() { # checkout core name flags...
  local start=$SECONDS
  (cd "$1" && taskset -c "$2" env TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 \
    python train_transform.py --task=sentiment --num_epochs="$epochs" \
      --early_stopping_patience=0 --ckpt_dir_save="$logs/run_$3" --cache_dir="$logs/cache_$3" \
      --overwrite=True "${@:4}" > "$logs/$3.log" 2>&1)
  echo "whole script: $(( SECONDS - start )) s" >> "$logs/$3.log"
}
for round in 1 2; do
  core_old=$(( round - 1 )); core_new=$(( 2 - round ))
  run "$old" "$core_old" "old_$round" "$@" &
  run "$new" "$core_new" "new_$round" "$@" &
  wait
done
for log in "$logs"/{old,new}_{1,2}.log; do
  echo "== $(basename "$log" .log)"
  grep -E "^ *[0-9]+/[0-9]+ - |^scratch |^whole script" "$log" | cut -c1-160
done
rm -rf "$logs"/run_* "$logs"/cache_*
