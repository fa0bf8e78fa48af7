"""What the benchmarks read off a TRL SFTTrainer as it runs, the same way for each: the real and the padded token
count of every batch its collator makes, and the last logged training loss."""


def count_batches(trainer, on_batch) -> None:
    """Wrap the trainer's collator: on_batch(real_tokens, total_tokens) for every batch it makes."""
    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        total = int(batch["input_ids"].numel())
        on_batch(int(batch["attention_mask"].sum()) if "attention_mask" in batch else total, total)
        return batch

    trainer.data_collator = counting_collator


def last_loss(trainer):
    """A callback added to the trainer whose `.loss` is the last logged training loss (nan before any)."""
    from transformers import TrainerCallback

    class LastLoss(TrainerCallback):
        loss = float("nan")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss = logs["loss"]

    callback = LastLoss()
    trainer.add_callback(callback)
    return callback
