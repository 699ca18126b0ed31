"""`vtc` through Lightning's DeepSpeedStrategy on CPU: DeepSpeed's own CPU accelerator
(DS_ACCELERATOR=cpu) and gloo, with the three CUDA-only assumptions of Lightning's strategy
lifted, so that what `vtc train` does under `deepspeed_stage_N` on GPUs (the engine built by
Lightning, vtc's checkpoints through it, SIGTERM saves, resume) runs in the tests:

- Lightning refuses any accelerator but CUDA (`DeepSpeedStrategy.setup_environment`);
- it checks that device indices match local ranks (CPU devices have no index);
- it hands DeepSpeed the device's index as `device_rank` (None on CPU; DeepSpeed takes -1 as
  "no device index").

vtc's own refusal of DeepSpeed on a machine without CUDA (`vtc validate`) is lifted too.
Everything else is vtc, Lightning and DeepSpeed as they are.

    python tests/deepspeed_on_cpu.py train tiny/smoke trainer.strategy=deepspeed_stage_3 trainer.devices=2

Lightning's launcher runs this file again for each further rank.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed  # noqa: E402
import lightning.pytorch.strategies.deepspeed as lightning_deepspeed  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy  # noqa: E402

import train.recipe  # noqa: E402
from train.cli import main  # noqa: E402


def setup_environment(strategy: DeepSpeedStrategy) -> None:
    DDPStrategy.setup_environment(strategy)  # what DeepSpeedStrategy's does after its CUDA check


def initialize(args=None, **kwargs):
    if args is not None and getattr(args, "device_rank", 0) is None:
        args.device_rank = -1
    return deepspeed_initialize(args=args, **kwargs)


deepspeed_initialize = deepspeed.initialize
DeepSpeedStrategy.setup_environment = setup_environment
lightning_deepspeed._validate_device_index_selection = lambda devices: None
deepspeed.initialize = initialize
train.recipe.torch_cuda_available = lambda: True

if __name__ == "__main__":
    sys.exit(main())
