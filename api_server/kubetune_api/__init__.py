"""kubetune's OpenAI-compatible fine-tuning API: files, jobs, events, checkpoints and models,
served from the cluster and backed by FineTuneJobs (docs/openai-api.md)."""
