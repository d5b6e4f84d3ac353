"""kubetune operator: reconciles FineTuneJobs into batch/v1 Jobs."""
