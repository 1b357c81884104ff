"""LoRA ranks: the learner may train only ranks a vLLM engine can serve, and an engine is sized from the rank."""

from __future__ import annotations

# The ranks a vLLM engine can be built for (vllm.config.lora.MaxLoRARanks). An adapter of any rank up to the
# engine's maximum loads: vLLM pads smaller ranks.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def engine_lora_rank(rank: int) -> int:
    """The smallest engine LoRA rank that holds an adapter of ``rank``."""
    for choice in VLLM_LORA_RANKS:
        if choice >= rank:
            return choice
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest, {VLLM_LORA_RANKS[-1]}")
