"""``deepspeed.utils.zero_to_fp32``: the consolidation functions users import, from ``shardwise.checkpoint``."""

from shardwise.checkpoint.consolidate import (
    convert_zero_checkpoint_to_fp32_state_dict,
    get_fp32_state_dict_from_zero_checkpoint,
    load_state_dict_from_zero_checkpoint,
    main,
)


def get_optim_files(checkpoint_dir: str) -> list[str]:
    """The per-rank files of a checkpoint tag directory that hold the optimizer state, in rank order (DeepSpeed's
    ``*_optim_states.pt``; in shardwise's format, each rank's ``rankNNNNN-<id>.safetensors`` holds its share of
    the model *and* optimizer state). Raises ``FileNotFoundError`` naming the directory when there are none."""
    import glob
    import os

    files = sorted(glob.glob(os.path.join(checkpoint_dir, "rank[0-9][0-9][0-9][0-9][0-9]-*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no shardwise rank files (rankNNNNN-*.safetensors) in {checkpoint_dir!r}: pass the "
                                "tag directory (<save_dir>/<tag>) of a checkpoint saved by save_checkpoint")
    return files


__all__ = ["convert_zero_checkpoint_to_fp32_state_dict", "get_fp32_state_dict_from_zero_checkpoint",
           "get_optim_files", "load_state_dict_from_zero_checkpoint", "main"]
