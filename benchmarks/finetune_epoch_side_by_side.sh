#!/bin/bash
# old vs new code, one sentiment epoch each, side by side on separate cores
run() { # dir core name
  cd $1 && taskset -c $2 env TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 python train_transform.py --task=sentiment --num_epochs=1 --early_stopping_patience=0 --ckpt_dir_save=/tmp/sent_$3 --cache_dir=/tmp/sentcache_$3 --overwrite=True > /tmp/sent_$3.log 2>&1
}
run /tmp/wt_old 0 old &
run /tmp/wt 1 new &
wait
