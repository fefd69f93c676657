"""`tidal simulate`: the scheduler's own policies over simulated engines whose costs come from each model's
fitted `CostModel` (docs/SCHEDULING.md). `workload` makes and reads request streams, `engine` simulates one
model's engine, `simulator` the scheduler's loop, `metrics` what a run measured, `report` one workload through
several policies, `validate` the comparison with a live run, `main` the command. Torch-free: importing any of
them but `main` imports no torch."""
