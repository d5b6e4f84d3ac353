"""The serving agent: the sidecar of a vLLM server pod that executes what the operator wants.

    kubetune-serving-agent fetch-model ...   the init container: the base model (or a full
                                             fine-tune, checked against its SHA256SUMS)
    kubetune-serving-agent run               the sidecar: desired ConfigMap -> vLLM -> state

The contract with the operator (the two ConfigMaps and their documents) is
kubetune_trainer.serving. No torch: the agent only moves files and talks HTTP.
"""
