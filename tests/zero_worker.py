"""One rank of the ZeRO test (tests/test_zero.py), launched by torch.distributed.run on CPU:

    DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 tests/zero_worker.py OUT 1 2 3

Real DeepSpeed engines (gloo) over the tiny LLaVA with vtc's ZeRO settings train a few steps;
vtc's gather/load code then saves the trainables, loads them into a freshly partitioned model,
and DeepSpeed's own checkpoint (trainables only, as vtc's strategy writes it) round-trips.
Rank 0 writes OUT/stage<N>/result.json for the test to check.
"""

import hashlib
import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.build import build  # noqa: E402
from tests.conftest import TEST_TINY  # noqa: E402
from train.freeze import apply_stage  # noqa: E402
from train.recipe import Freeze, LoraRecipe, Stage  # noqa: E402
from train.run import trainable_names  # noqa: E402
from train.strategy import deepspeed_config  # noqa: E402
from train.zero import is_partitioned, load_state, trainable_state  # noqa: E402

STAGE = Stage(
    name="zero",
    train=Freeze(vision="frozen", projector="full", llm="lora"),
    lora=LoraRecipe(r=4, alpha=8, dropout=0.0),
)


def engine_for(zero_stage: int, seed: int):
    built = build("tiny", tiny=TEST_TINY, seed=seed)
    apply_stage(built.model, STAGE)
    config = deepspeed_config(zero_stage)
    config["gradient_clipping"] = 1.0  # Lightning fills it from the Trainer; raw DeepSpeed needs it here
    config["train_micro_batch_size_per_gpu"] = 2
    config["gradient_accumulation_steps"] = 1
    # vtc's ZeRO-3 settings keep parameters under 1e6 elements whole; every tiny parameter is
    # that small, so partition them all here to exercise the gather paths for real.
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size"):
        if key in config["zero_optimization"]:  # LLaVA's 5e8-element buckets: slow to set up on CPU
            config["zero_optimization"][key] = 1e6
    params = [p for p in built.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    engine, *_ = deepspeed.initialize(model=built.model, optimizer=optimizer, config=config)
    return built, engine


def batch(built, rank: int):
    generator = torch.Generator().manual_seed(100 + rank)
    tok = built.tokenizer
    text = tok("What colour is the dot ?", add_special_tokens=False).input_ids
    ids = torch.tensor([[tok.bos_token_id, built.model.image_token_id, *text]] * 2)
    return ids, torch.ones_like(ids, dtype=torch.bool), torch.randn(2, 3, 64, 64, generator=generator)


def digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + tensors[name].numpy().tobytes())
    return h.hexdigest()


def logits(engine, inputs) -> torch.Tensor:
    with torch.no_grad():
        return engine(*inputs, return_logits=True).logits


def check(zero_stage: int, out: Path) -> None:
    rank = dist.get_rank()
    built, engine = engine_for(zero_stage, seed=1)
    names = trainable_names(built.model)
    for _ in range(3):
        loss = engine(*batch(built, rank), return_logits=True).logits.float().pow(2).mean()
        engine.backward(loss)
        engine.step()
    projector_weight = engine.module.projector.state_dict()
    empty = sum(1 for v in projector_weight.values() if v.numel() == 0)
    state = trainable_state(engine.module, names)
    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, digest(state))
    probe = batch(built, 0)
    trained_logits = logits(engine, probe)

    # a freshly built partitioned model (same base, untrained trainables) gets the saved ones
    fresh_built, fresh = engine_for(zero_stage, seed=1)
    before = trainable_state(fresh.module, names)
    load_state(fresh.module, state)
    reloaded = trainable_state(fresh.module, names)

    # DeepSpeed's own checkpoint, trainables only, loaded non-strictly (what Lightning does)
    engine.save_checkpoint(str(out / "ds"), tag="t", exclude_frozen_parameters=True)
    _, third = engine_for(zero_stage, seed=1)
    third.load_checkpoint(str(out / "ds"), tag="t", load_module_strict=False)
    from_ds = trainable_state(third.module, names)

    result = {
        "partitioned": sum(is_partitioned(p) for p in engine.module.parameters()),
        "parameters": sum(1 for _ in engine.module.parameters()),
        "empty_projector_tensors_outside_gather": empty,
        "shapes": {k: list(v.shape) for k, v in state.items()},
        "rank_digests": every_rank,
        "changed_by_training": digest(before) != digest(state),
        "reloaded_equal": digest(reloaded) == digest(state),
        "same_logits_after_load": torch.equal(logits(fresh, probe), trained_logits),
        "deepspeed_checkpoint_equal": digest(from_ds) == digest(state),
        "finite": all(bool(torch.isfinite(v).all()) for v in state.values()),
    }
    if rank == 0:
        save_file(state, str(out / "trainable.safetensors"))
        (out / "result.json").write_text(json.dumps(result, indent=1))
    dist.barrier()


if __name__ == "__main__":
    deepspeed.init_distributed(dist_backend="gloo")
    for stage in sys.argv[2:]:
        folder = Path(sys.argv[1]) / f"stage{stage}"
        folder.mkdir(parents=True, exist_ok=True)
        check(int(stage), folder)
