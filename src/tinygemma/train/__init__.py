"""Stage 2, `tinygemma train` / `finetune`: config and recipes, batches, optimizers, the Trainer, checkpoints."""
