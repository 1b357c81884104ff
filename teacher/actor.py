"""The teacher as a Ray actor: ``TeacherScorer`` itself, remote.

    actor = TeacherActor.options(num_gpus=1).remote(model_path, config, temperature=1.1, prompt=prompt_config)
    result = ray.get(actor.score.remote(rollout_table_ref), timeout=600)

Resources (GPUs, CPUs) are chosen by the caller with ``.options``, which is where placement groups attach. Tables
travel through the object store; pass object refs, not tables, between actors.
"""

import ray

from teacher.scorer import TeacherScorer

TeacherActor = ray.remote(TeacherScorer)
