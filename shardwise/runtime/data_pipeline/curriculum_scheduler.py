"""``deepspeed.runtime.data_pipeline.curriculum_scheduler`` (``shardwise.data.curriculum``)."""

from shardwise.data.curriculum import CurriculumScheduler

__all__ = ["CurriculumScheduler"]
