"""One rank of the methods-under-ZeRO-3 test (tests/test_zero.py), launched on CPU by

    DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 tests/zero_methods_worker.py OUT DATA RECIPE:STAGE ...

For each tiny recipe stage: the model its run trains (components, views, LoRA as the stages up
to that one inject it) trains a few steps as a DeepSpeed ZeRO-3 engine with every parameter
partitioned (vtc's settings otherwise), both ranks on the same batch, and as a plain torch model
on that batch in this process. SGD with momentum, so that the weights differ only by what the
gradients differ by (Adam would turn a gradient of 1e-8 into a step of the learning rate).
Rank 0 writes OUT/<recipe>-<stage>.json: the losses both ways, and per trainable tensor the
largest weight difference and whether the reference's last step gave it a gradient; and prints
one line per stage with the largest differences. The spec `after_training`, run after the
stages whatever its place, is a run's end under ZeRO-3 (OUT/after_training.json).
"""

import copy
import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.synth import region_classes  # noqa: E402
from models.compressors.base import Progress  # noqa: E402
from models.gather import is_partitioned  # noqa: E402
from models.region_head import RegionHead  # noqa: E402
from train.datamodule import collate  # noqa: E402
from train.freeze import apply_stage  # noqa: E402
from train.objectives import OBJECTIVES, loss_terms, weighted_total  # noqa: E402
from train.recipe import load_recipe  # noqa: E402
from train.run import build_from_recipe, stage_data, trainable_names  # noqa: E402
from train.strategy import deepspeed_config  # noqa: E402
from train.zero import trainable_state  # noqa: E402

STEPS, BATCH, LR = 4, 4, 0.05


class StageLoss(torch.nn.Module):
    """What vtc's LightningModule computes from a batch: the stage objective's weighted loss."""

    def __init__(self, model, stage, region_head):
        super().__init__()
        self.model, self.region_head, self.stage = model, region_head, stage
        self.objective = OBJECTIVES[stage.objective]
        names = [getattr(c, "registry_name", type(c).__name__) for c in model.components()]
        self.terms = list(loss_terms(self.objective, names))

    def forward(self, batch):
        terms = self.objective.terms(self.model, batch, self.region_head)
        return weighted_total(terms, self.stage.loss_weights, self.terms)


def stage_batch(recipe, built, stage):
    """The stage's first BATCH training samples, encoded as its run encodes them; rank 0 first
    (it writes the data cache), the other rank then reads them."""

    def encoded():
        data = stage_data(recipe, stage, built)
        return collate([data.dataset[i] for i in range(BATCH)], pad_token_id=data.pad_token_id)

    batch = encoded() if dist.get_rank() == 0 else None
    dist.barrier()
    return batch if batch is not None else encoded()


def zero_3_config() -> dict:
    """vtc's ZeRO-3 settings with every parameter partitioned, however small, and small buckets
    (LLaVA's 5e8-element ones are slow to set up on CPU); no clipping, a fixed micro-batch."""
    config = deepspeed_config(3)
    config.update(gradient_clipping=0.0, train_micro_batch_size_per_gpu=BATCH, gradient_accumulation_steps=1)
    config["zero_optimization"].update(
        stage3_param_persistence_threshold=0,
        reduce_bucket_size=1e6,
        allgather_bucket_size=1e6,
        stage3_prefetch_bucket_size=1e6,
    )
    return config


def check(name: str, stage_index: int, data_dir: Path) -> dict:
    overrides = [f"data.cache_dir={data_dir}", "data.synthetic.train=16", "data.synthetic.test=1"]
    recipe = load_recipe(name, overrides, check_machine=False)
    torch.manual_seed(0)
    built = build_from_recipe(recipe)
    for stage in recipe.stages[: stage_index + 1]:  # LoRA as the run's stages inject it
        apply_stage(built.model, stage)
    stage = recipe.stages[stage_index]
    head = None
    if OBJECTIVES[stage.objective].region_targets:
        head = RegionHead(built.model.dims.vision_width, region_classes(recipe.data.synthetic.grid))
    batch = stage_batch(recipe, built, stage)
    loss_fn = StageLoss(built.model, stage, head)
    reference = copy.deepcopy(loss_fn)
    initial = {k: v.detach().clone() for k, v in reference.model.named_parameters() if v.requires_grad}
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    ref_optimizer = torch.optim.SGD(ref_params, lr=LR, momentum=0.9)

    params = [p for p in loss_fn.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=loss_fn, optimizer=torch.optim.SGD(params, lr=LR, momentum=0.9), config=zero_3_config()
    )
    losses = []
    for step in range(STEPS):
        progress = Progress(step, STEPS, tuple(loss_fn.terms), stage.components)
        built.model.set_progress(progress)
        reference.model.set_progress(progress)
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
        ref_loss = reference(batch)
        ref_optimizer.zero_grad(set_to_none=True)
        ref_loss.backward()
        ref_optimizer.step()
        losses.append([loss.item(), ref_loss.item()])
    trained = trainable_state(built.model, trainable_names(built.model))  # gathered
    ref_named = dict(reference.model.named_parameters())
    tensors = {
        key: {
            "max_diff": (value.float() - ref_named[key].detach().float()).abs().max().item(),
            "scale": ref_named[key].detach().float().abs().max().item(),
            "trained_by": (ref_named[key].detach() - initial[key]).abs().max().item(),
            "last_step_gradient": ref_named[key].grad is not None,
        }
        for key, value in trained.items()
    }
    return {"losses": losses, "tensors": tensors}


def after_training(out: Path, data_dir: Path) -> None:
    """A run's end under ZeRO-3: every rank saves the trainables as `vtc train` does, the other
    ranks end, and rank 0 alone takes the model it writes `hf/` from and evaluates
    (`train.run.whole_model`) and scores the batch with it."""
    from train.outputs import write_text_atomic
    from train.recipe import recipe_to_yaml
    from train.run import save_trainables, whole_model

    run_dir = out / "run"
    recipe = load_recipe(
        "tiny/tokenpacker", [f"data.cache_dir={data_dir}", f"output={run_dir}"], check_machine=False
    )
    torch.manual_seed(0)
    built = build_from_recipe(recipe)
    stage = recipe.stages[0]
    apply_stage(built.model, stage)
    if dist.get_rank() == 0:
        run_dir.mkdir(parents=True)
        write_text_atomic(run_dir / "recipe.yaml", recipe_to_yaml(recipe))
    batch = stage_batch(recipe, built, stage)
    loss_fn = StageLoss(built.model, stage, None)
    params = [p for p in loss_fn.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=loss_fn, optimizer=torch.optim.SGD(params, lr=LR), config=zero_3_config()
    )
    for _ in range(2):
        engine.backward(engine(batch))
        engine.step()
    names = trainable_names(built.model)
    trained = trainable_state(built.model, names)  # gathered, on every rank
    save_trainables(built.model, names, run_dir, write=dist.get_rank() == 0)
    partitioned = any(is_partitioned(p) for p in built.model.parameters())
    loss_fn.eval()
    with torch.no_grad():
        engine_loss = engine(batch).item()  # the partitioned model, every rank taking part
    dist.barrier()
    if dist.get_rank() != 0:
        return  # this rank's process ends, as `vtc train`'s other ranks do after the save
    whole = whole_model(built, run_dir)
    whole.model.eval()
    with torch.no_grad():
        loss = StageLoss(whole.model, stage, None)(batch).item()
        weights = dict(whole.model.named_parameters())
        same = all(torch.equal(weights[k].detach(), v) for k, v in trained.items())
    result = {
        "partitioned": partitioned,
        "loss": loss,
        "engine_loss": engine_loss,
        "same_weights": same,
        "trained": len(trained),
    }
    (out / "after_training.json").write_text(json.dumps(result))


def main() -> None:
    out, data_dir, specs = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    deepspeed.init_distributed(dist_backend="gloo")
    for spec in (s for s in specs if s != "after_training"):
        name, stage_index = spec.rsplit(":", 1)
        result = check(name, int(stage_index), data_dir)
        if dist.get_rank() == 0:
            (out / f"{name.replace('/', '-')}-{stage_index}.json").write_text(json.dumps(result))
            print(summary(spec, result), flush=True)
    dist.barrier()  # a rank that left while the other still talked to it aborted now and then
    if "after_training" in specs:  # last: the other ranks end in it, as `vtc train`'s do
        after_training(out, data_dir)
    dist.destroy_process_group()


def summary(spec: str, result: dict) -> str:
    """One line: how far apart the losses and the weights ended, ZeRO-3 against plain torch."""
    loss = max(abs(a - b) / abs(b) for a, b in result["losses"])
    key, worst = max(result["tensors"].items(), key=lambda kv: kv[1]["max_diff"])
    idle = [t["max_diff"] for t in result["tensors"].values() if not t["last_step_gradient"]]
    trained = max(t["trained_by"] for t in result["tensors"].values())
    return (
        f"{spec}: the weights moved by up to {trained:.2g} in {STEPS} steps; "
        f"losses at most {loss:.2g} apart (relative), weights at most {worst['max_diff']:.2g} "
        f"({key}, largest weight {worst['scale']:.2g}); tensors without a gradient in the last "
        f"step moved by at most {max(idle, default=0.0):.2g}"
    )


if __name__ == "__main__":
    main()
