"""kubetune trainer: the program inside the fine-tuning pod."""
