"""Ray Tune sweeps of PedXnet pretraining and fine-tuning (spaces, runner, report)."""
