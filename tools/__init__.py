"""Commands above common.py: they use trained runs, many runs or a dataset once. `python -m tools COMMAND ...`
(or its shortcut `python common.py COMMAND ...`), from the kit's folder:

  predict RUN_DIR INPUT... --out OUT_DIR [--masks MASK_DIR] [--net teacher|student] [--device D] [--amp A]
          [--tile H,W] [--overlay] [--batch-size N]                                    (predict.py)
  evaluate SOURCE [--net teacher|student] [--json FILE] [TRAINING OPTIONS]      (evaluate.py)
  seeds SCRIPT [--seeds S ...] [--runs RUNS] [--dry-run] -- SCRIPT_OPTIONS            (paper.py)
  summary [RUNS_DIR]                                                                  (paper.py)
  costs [--datasets D ...] [--methods M ...] [--iters N] [--nproc K] [-- OPTIONS]     (costs.py)
  sbd-to-aug SBD_ROOT VOC_ROOT                                                        (sbd.py)

Each imports common; common imports none of them."""
