"""Training ClipCap: MLE pre-training with `transformers.Trainer`, and self-retrieval (SR)
REINFORCE fine-tuning with `SRTrainer` (NDLB Sec. 4)."""

from .bags import BagBatchSampler, BagCollator, BagCurriculumCallback, bags_from_cocoids, parse_bag_schedule
from .baselines import GreedyBaseline, LeaveOneOutBaseline, MeanBaseline, build_baseline
from .data import CaptionCollator, CaptionPairs, join_caption_columns
from .lora import sr_lora_config
from .rewards import CiderReward, SelfRetrievalReward
from .sr_config import SRConfig
from .sr_trainer import SRTrainer, completion_mask

__all__ = [
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
