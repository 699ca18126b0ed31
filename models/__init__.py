"""vtc models: the LLaVA assembly from HF parts, the compressor registry, FLOPs.

Never imports lightning, deepspeed or wandb (tests/test_end_to_end.py checks it).

    from models.build import build, ComponentSpec
    built = build("tiny")                      # or a local llava-hf directory
    built.model(input_ids, attention_mask, pixel_values, labels).loss
"""
