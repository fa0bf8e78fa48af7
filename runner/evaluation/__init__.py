"""Fine-tuned vs base on held-out chats: metrics, paired statistics, the outputs, and the local evaluator engine."""
