"""The OpenAI fine-tuning quickstart, unchanged, against kubetune's OpenAI-compatible API.

    set -a; . .dev/openai.env; set +a      # OPENAI_BASE_URL, OPENAI_API_KEY (make demo writes it)
    python examples/openai/finetune.py training_data.jsonl [model]

The model defaults to the first base model the cluster offers (`client.models.list()`); the
lines below the marker are the OpenAI client code exactly as the issue (#13) writes it.
"""

import os
import sys

from openai import OpenAI

training_data = sys.argv[1] if len(sys.argv) > 1 else "training_data.jsonl"
client = OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key=os.environ["OPENAI_API_KEY"])
base_models = [m.id for m in client.models.list() if not m.id.startswith("ft:")]
BASE = sys.argv[2] if len(sys.argv) > 2 else base_models[0]

# --- as written
# fmt: off
file = client.files.create(file=open(training_data, "rb"), purpose="fine-tune")  # noqa: SIM115
job = client.fine_tuning.jobs.create(training_file=file.id, model=BASE, hyperparameters={"n_epochs": 3})  # noqa: E501
job = client.fine_tuning.jobs.retrieve(job.id); print(job.status)  # noqa: E702
for event in client.fine_tuning.jobs.list_events(job.id, limit=10).data:
    print(event.created_at, event.message)
# fmt: on
