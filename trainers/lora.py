"""SR-L, SR-V and SR-LV: which parts of ClipCap get LoRA adapters (NDLB Sec. 4.2, 4.5).

"When fine-tuning with REINFORCE, ClipCap's MLP adapter is trained normally while CLIP and GPT-2
are fine-tuned with LoRA adapters with rank 32." The adapters sit where the authors put them:
GPT-2's attention projections (``attn.c_attn``, ``attn.c_proj``) and the CLIP vision tower's
attention input projections and MLP (``q_proj``, ``k_proj``, ``v_proj``, ``fc1``, ``fc2``; the
authors adapt OpenAI CLIP's fused ``in_proj_weight`` with one rank-32 adapter, transformers' CLIP
has three separate projections, so each gets its own). Rank 32, alpha 16, and the authors'
initialisation (:func:`init_lora_as_authors`).
"""

from __future__ import annotations

import torch
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


@torch.no_grad()
def init_lora_as_authors(model: torch.nn.Module) -> int:
    """Re-initialise every LoRA adapter as the authors' ``finetuning/lora.py`` does:
    ``lora_A ~ N(0, 1)``, ``lora_B = 0`` (the update ``B @ A`` starts at zero, scaled by alpha / r).

    PEFT's default gives ``lora_A`` a Kaiming-uniform init (std ~0.02 for GPT-2's width), so at the
    paper's learning rate (9e-8) the adapters move ~50x less than the authors'. Call after
    ``get_peft_model``. Returns the number of adapted layers.
    """
    count = 0
    for module in model.modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or not isinstance(lora_b, torch.nn.ModuleDict):
            continue
        for name in lora_a:
            torch.nn.init.normal_(lora_a[name].weight, mean=0.0, std=1.0)
            torch.nn.init.zeros_(lora_b[name].weight)
            count += 1
    return count


__all__ = ["LANGUAGE_TARGETS", "VISION_TARGETS", "init_lora_as_authors", "sr_lora_config"]
