"""Where the prompt ends: every position's role survives pruning, replacing and re-padding."""

import torch

from data import IGNORE_INDEX
from data.templates import get_template
from models.build import build
from models.sequence import PROMPT, RESPONSE, VISUAL
from tests.conftest import TEST_TINY

CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat colour is the dot?"},
    {"from": "gpt", "value": "b3 . red"},
    {"from": "human", "value": "Is there a circle?"},
    {"from": "gpt", "value": "none . no"},
]


def merged(template: str, padding_side: str = "right", with_labels: bool = True, tokenizer=None):
    """A batch of two samples (the second one's conversation cut after its first answer),
    merged with 64 visual tokens each: (model, state, the encoded samples)."""
    model = build("tiny", tiny=TEST_TINY, seed=0).model
    with torch.no_grad():  # each text position's embedding carries its token id (see real_ids)
        table = model.llm.body.embed_tokens.weight
        table.zero_()
        table[:, 0] = torch.arange(table.shape[0])
    tmpl = get_template(template)
    conversations = [CONVERSATION, CONVERSATION[:2]] if template != "plain" else [CONVERSATION[:2]] * 2
    encoded = [tmpl.encode(c, tokenizer, model.image_token_id, 200) for c in conversations]
    length = max(len(e.input_ids) for e in encoded)
    ids = torch.zeros(2, length, dtype=torch.long)
    labels = torch.full((2, length), IGNORE_INDEX)
    mask = torch.zeros(2, length, dtype=torch.bool)
    for b, e in enumerate(encoded):
        ids[b, : len(e.input_ids)], labels[b, : len(e.labels)] = (
            torch.tensor(e.input_ids),
            torch.tensor(e.labels),
        )
        mask[b, : len(e.input_ids)] = True
    visual = model.encode_images(torch.randn(2, 3, 64, 64))
    state = model.merge(ids, mask, visual, labels if with_labels else None, padding_side)
    return model, state, encoded


def real_ids(state, model):
    """Token id at every text position of the state (the embeddings carry it in channel 0)."""
    return state.hidden[..., 0].round().long()


def test_vicuna_prompt_is_the_first_question_and_assistant_tag(tokenizer):
    model, state, encoded = merged("vicuna_v1", tokenizer=tokenizer)
    ids = real_ids(state, model)
    for b in range(2):
        prompt = tokenizer.decode(ids[b][state.prompt_mask[b]].tolist())
        prompt = prompt.replace(" ", "")
        assert "Whatcolouristhedot?" in prompt and prompt.endswith("ASSISTANT:")
        assert "red" not in prompt and "circle" not in prompt  # no answer, no later turn
        first_answer = int((state.labels[b] != IGNORE_INDEX).nonzero()[0])
        assert int(state.last_prompt_index()[b]) == first_answer - 1
        assert bool(state.response_mask[b, first_answer]) and not state.response_mask[b, :first_answer].any()
        assert int((state.role[b] == VISUAL).sum()) == 64


def test_plain_template_has_no_prompt_and_predicts_from_the_last_visual_token(tokenizer):
    _, state, _ = merged("plain", tokenizer=tokenizer)
    assert not state.prompt_mask.any()
    last_visual = [int(state.visual_mask[b].nonzero()[-1]) for b in range(2)]
    assert state.last_prompt_index().tolist() == last_visual


def test_roles_survive_keep_replace_and_left_padding(tokenizer):
    for side in ("right", "left"):
        model, state, _ = merged("vicuna_v1", padding_side=side, tokenizer=tokenizer)
        prompt_before = [real_ids(state, model)[b][state.prompt_mask[b]].tolist() for b in range(2)]
        # drop every other visual token of sample 0 and all but 3 of sample 1 (ragged)
        rank = torch.cumsum(state.visual_mask.long(), 1)
        keep = ~state.visual_mask | torch.stack([rank[0] % 2 == 0, rank[1] <= 3])
        pruned = state.keep(keep)
        replaced = pruned.replace_visual(torch.randn(2, 5, pruned.hidden.shape[-1]))
        for after in (pruned, replaced):
            ids = real_ids(after, model)
            assert [ids[b][after.prompt_mask[b]].tolist() for b in range(2)] == prompt_before
            assert torch.equal(after.role == VISUAL, after.visual_mask & after.attention_mask)
            last = after.last_prompt_index()
            assert all(int(after.role[b, last[b]]) == PROMPT for b in range(2))
            assert all(
                int(after.role[b, last[b] + 1]) == RESPONSE
                for b in range(2)
                if last[b] + 1 < after.role.shape[1] and after.attention_mask[b, last[b] + 1]
            )
        assert replaced.num_visual.tolist() == [5, 5]


def test_a_prompt_without_labels_is_all_prompt_after_the_image(tokenizer):
    _, state, _ = merged("vicuna_v1", padding_side="left", with_labels=False, tokenizer=tokenizer)
    assert not state.response_mask.any()
    assert torch.equal(state.last_prompt_index(), state.last_index())
