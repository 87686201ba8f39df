"""SR-L, SR-V and SR-LV: which parts of ClipCap get LoRA adapters (NDLB Sec. 4.2, 4.5).

"When fine-tuning with REINFORCE, ClipCap's MLP adapter is trained normally while CLIP and GPT-2
are fine-tuned with LoRA adapters with rank 32." The adapters sit where the authors put them:
GPT-2's attention projections (``attn.c_attn``, ``attn.c_proj``) and the CLIP vision tower's
attention input projections and MLP (``q_proj``, ``k_proj``, ``v_proj``, ``fc1``, ``fc2``).
"""

from __future__ import annotations

from peft import LoraConfig

LANGUAGE_TARGETS = r"language_model\.transformer\.h\.\d+\.attn\.(c_attn|c_proj)"
VISION_TARGETS = r"vision_model\.vision_model\.encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj)|mlp\.(fc1|fc2))"


def sr_lora_config(modules: str = "LV", rank: int = 32, alpha: int = 16, dropout: float = 0.0) -> LoraConfig | None:
    """LoRA config for `modules` = "L" (GPT-2), "V" (CLIP vision tower) or "LV" (both); the mapper
    is trained in full (``modules_to_save``). "none" → None (full fine-tuning, no adapters)."""
    targets = {"L": [LANGUAGE_TARGETS], "V": [VISION_TARGETS], "LV": [LANGUAGE_TARGETS, VISION_TARGETS]}
    if modules == "none":
        return None
    if modules not in targets:
        raise ValueError(f"LoRA modules must be 'L', 'V', 'LV' or 'none', got {modules!r}")
    pattern = "(" + "|".join(targets[modules]) + ")"
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern,
                      modules_to_save=["mapper"], bias="none")


__all__ = ["LANGUAGE_TARGETS", "VISION_TARGETS", "sr_lora_config"]
