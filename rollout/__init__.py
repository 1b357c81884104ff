"""The rollout stage: vLLM engines that sample the student's traces and serve the learner's adapter versions.

    config.py     RolloutConfig (the ``rollout`` section of the run config)
    pool.py       RolloutPool: the stage's actors as one object (the orchestrator's only way in)
    worker.py     RolloutWorker: one engine, ``generate`` and ``load_adapter`` (a plain class)
    table.py      sample ids and seeds of the n traces of a prompt, the rollout table, its statistics
    adapters.py   checks an adapter version against the engine before it is loaded
    serving.py    how an engine serves adapter versions: vLLM LoRA, or written into its weights (CPU default)
    merge.py      W0 + scale * B @ A as PEFT computes it, and the base weights read from the checkpoint
    resources.py  engine arguments, start environment and CPU cores
"""
