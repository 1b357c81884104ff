"""The rollout stage: vLLM engines that sample the student's traces and serve the learner's adapter versions.

    pool.py       RolloutPool: the stage's actors as one object (the orchestrator's only way in)
    worker.py     RolloutWorker: one engine, ``generate`` and ``load_adapter`` (a plain class)
    table.py      sample ids and seeds of the n traces of a prompt, the rollout table, its summary
    serving.py    how an engine serves adapter versions: vLLM LoRA, or written into its weights (CPU default)
    merge.py      the LoRA merge W0 + scale * B @ A as PEFT computes it, and the base weights
    resources.py  engine arguments and start environment; config.py: RolloutConfig
"""
