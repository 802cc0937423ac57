"""Seeing a run: what happened (`timeline`), TensorBoard scalars (`tensorboard`), the HTML run
report (`runreport`, its plots in `plots`) and the one-line status (`status`)."""
