"""What no training step runs, through `python common.py TOOL ...`:

  python common.py seeds SCRIPT [--seeds S ...] [--runs RUNS] [--dry-run] -- SCRIPT_OPTIONS   (paper.py)
  python common.py summary [RUNS_DIR]                                                        (paper.py)
  python common.py costs [--datasets D ...] [--methods M ...] [--iters N] [--nproc K] [-- OPTIONS]  (bench.py)
  python common.py sbd-to-aug SBD_ROOT VOC_ROOT                                              (prepare.py)
  python common.py predict RUN_DIR INPUT... --out OUT_DIR [--masks MASK_DIR] [--net teacher|student]
                           [--device D] [--amp A] [--tile H,W] [--overlay]                     (predict.py)

bench.py also serves train_*.py --benchmark; prepare.py, a dataset's first run (README 'Datasets')."""
