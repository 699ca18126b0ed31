import sys
from pathlib import Path

import pytest
import torch

from data.synth import write_synthetic
from models.tiny import TinyConfig, tiny_tokenizer

torch.set_num_threads(2)


# Opt-in groups of long checks: each runs only with its flag (`.ci/run` passes both).
OPT_IN = {
    "families": "each GPU recipe family under 2-process DDP on CPU, ~2 min each, FALCON's through "
    "Lightning's DeepSpeed on CPU, and multi-process failure tests",
    "benches": "the README's bench scripts end to end at two steps a stage, ~1 min each",
}


def pytest_addoption(parser):
    for marker, what in OPT_IN.items():
        parser.addoption(
            f"--{marker}", action="store_true", help=f"also run the tests marked `{marker}` ({what})"
        )


def pytest_collection_modifyitems(config, items):
    for marker in OPT_IN:
        if config.getoption(f"--{marker}"):
            continue
        skip = pytest.mark.skip(reason=f"opt-in: run with --{marker}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def pil_defaults(monkeypatch):
    """Importing lmms-eval's tasks (tests/test_lmms.py) sets PIL's LOAD_TRUNCATED_IMAGES for the
    whole process; every test starts from PIL's default, so that what vtc does with an image cut
    short does not depend on the order the tests run in."""
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)


# Smaller than the default tiny model: the same classes, quicker tests.
TEST_TINY = TinyConfig(
    vision_width=32, vision_layers=2, vision_heads=2, llm_width=64, llm_layers=3, llm_heads=4
)


def smoke_train_cmd(run_dir: Path, data_dir: Path, *overrides: str) -> list[str]:
    """`vtc train tiny/smoke` as a subprocess command, writing to run_dir with its data in data_dir."""
    return [
        sys.executable,
        "-m",
        "train.cli",
        "train",
        "tiny/smoke",
        f"output={run_dir}",
        f"data.cache_dir={data_dir}",
        *overrides,
    ]


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def synth_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root / "train", "train", 64, progress=False)
    write_synthetic(root / "test", "test", 16, progress=False)
    return root


def ragged_prompts(model, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Two right-padded prompts with one image each, of 6 and 4 tokens: ids and mask (2, 6)."""
    rows = [
        [tokenizer.bos_token_id, model.image_token_id, 10, 11, 12, 13],
        [tokenizer.bos_token_id, model.image_token_id, 10, 11],
    ]
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    for b, row in enumerate(rows):
        ids[b, : len(row)], mask[b, : len(row)] = torch.tensor(row), True
    return ids, mask


def assert_generation_matches_forwards(model, prompt, pixels, generated, steps: int, **forward_kwargs):
    """Greedy generation with the KV cache equals greedy decoding by full forwards of the
    growing sequence, for `steps` tokens of one sample (`prompt`: its ids; `generated`: (N,))."""
    seq = [int(t) for t in prompt]
    for t in range(steps):
        with torch.no_grad():
            logits = model(
                torch.tensor([seq]),
                torch.ones(1, len(seq), dtype=torch.bool),
                pixels,
                return_logits=True,
                **forward_kwargs,
            ).logits
        logits[0, -1, model.image_token_id] = float("-inf")  # generate never emits <image>
        assert int(logits[0, -1].argmax()) == int(generated[t]), f"step {t}"
        seq.append(int(generated[t]))


def falcon_export(out_dir: Path, scale: float = 0.1) -> Path:
    """A vtc export of FALCON (4 registers, a thumbnail + 2 × 2 crops) on the shipped tiny base,
    its ReAtten moved `scale` × N(0, 1) away from its layer's copy, as after training (a copy
    alone adds the same update twice, which switching it off would only halve)."""
    from models.build import ComponentSpec, build
    from models.export import export
    from models.pretrained import shipped_path
    from models.views import MultiViewConfig

    base = str(shipped_path("tiny-llava"))
    spec = ComponentSpec("falcon", {"registers": 4})
    built = build(base, compressors=[spec], views=MultiViewConfig(((1, 1), (2, 2)), newline=False))
    with torch.no_grad():
        for p in built.model.compressors[0].reatten.parameters():
            p.add_(scale * torch.randn_like(p))
    return export(built, out_dir, ComponentSpec("mlp2x_gelu"), [spec], base, compressor_only=True)
