"""Training ClipCap: MLE pre-training with `transformers.Trainer`, and self-retrieval (SR)
REINFORCE fine-tuning with `SRTrainer` (NDLB Sec. 4)."""

from .bags import BagBatchSampler, BagCollator, BagCurriculumCallback, bags_from_cocoids, parse_bag_schedule
from .baselines import GreedyBaseline, LeaveOneOutBaseline, MeanBaseline, build_baseline
from .data import CaptionCollator, CaptionPairs, join_caption_columns
from .lora import init_lora_as_authors, sr_lora_config
from .rewards import CiderReward, SelfRetrievalReward, as_references, resolve_scale
from .sr_config import AUTHORS_BAG_CURRICULUM, SRConfig
from .sr_trainer import SRStateCallback, SRTrainer, completion_mask, last_complete_checkpoint

__all__ = [
    "AUTHORS_BAG_CURRICULUM",
    "SRStateCallback",
    "as_references",
    "init_lora_as_authors",
    "last_complete_checkpoint",
    "resolve_scale",
    "BagBatchSampler",
    "BagCollator",
    "BagCurriculumCallback",
    "CaptionCollator",
    "CaptionPairs",
    "CiderReward",
    "GreedyBaseline",
    "LeaveOneOutBaseline",
    "MeanBaseline",
    "SRConfig",
    "SRTrainer",
    "SelfRetrievalReward",
    "bags_from_cocoids",
    "build_baseline",
    "join_caption_columns",
    "completion_mask",
    "parse_bag_schedule",
    "sr_lora_config",
]
