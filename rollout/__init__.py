"""The rollout stage: vLLM engines that sample the student's traces and hot-load LoRA adapter versions.

    config.py     RolloutConfig (the ``rollout`` section of the run config)
    worker.py     RolloutWorker: the engine, ``generate`` and ``load_adapter`` (plain class)
    actor.py      the same as a Ray actor, and the calls the orchestrator makes on a group of them
    sharding.py   shard a batch over R workers, merge their tables back in order
    table.py      sample ids and seeds of the n traces of a prompt, the rollout table, its statistics
    adapters.py   checks an adapter version against the engine before it is loaded
    serving.py    how an engine serves adapter versions: vLLM LoRA, or merged into its weights (CPU default)
    merge.py      W0 + scale * B @ A as PEFT computes it, and the base weights read from the checkpoint
    resources.py  engine arguments, start environment and CPU cores

Importing this package imports neither vLLM nor Ray (``rollout.actor`` imports Ray; vLLM is imported when a worker
starts its engine).
"""
