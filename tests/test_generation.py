"""generate() with transformers' own caches: every decoding path agrees with the plain forward."""

import pytest
import torch
from transformers import DynamicCache

from helpers import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


def test_greedy_with_cache_equals_greedy_without(model, input_ids):
    with_cache = model.generate(input_ids, max_new_tokens=10, do_sample=False, use_cache=True)
    without = model.generate(input_ids, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)


def test_incremental_decoding_equals_the_full_forward(model, input_ids):
    with torch.no_grad():
        full = model(input_ids).logits
        cache = DynamicCache(config=model.config)
        prefix = 4
        steps = [model(input_ids[:, :prefix], cache=cache, use_cache=True).logits]
        for position in range(prefix, input_ids.shape[1]):
            steps.append(model(input_ids[:, position : position + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    # the cache holds every track's KV heads, one entry per layer
    keys = cache.layers[0].keys
    assert keys.shape[1] == model.config.num_key_value_heads
    assert len(cache.layers) == model.config.num_hidden_layers


def test_the_old_cache_keyword_is_accepted(model, input_ids):
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids[:, :5], past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() == 5


def test_seeded_sampling_is_reproducible(model, input_ids):
    def sample(seed):
        torch.manual_seed(seed)
        return model.generate(input_ids, max_new_tokens=12, do_sample=True, temperature=1.5, top_k=0)

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))


def test_beam_search_with_and_without_cache(model, input_ids):
    kwargs = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False)
    with_cache = model.generate(input_ids, use_cache=True, **kwargs)
    without = model.generate(input_ids, use_cache=False, **kwargs)
    assert with_cache.shape == (4, input_ids.shape[1] + 8)
    assert torch.equal(with_cache, without)


def test_rows_of_a_left_padded_batch_equal_prompts_run_alone(model):
    pad = 0
    model.generation_config.pad_token_id = pad
    short, long = torch.tensor([[5, 9, 11]]), torch.tensor([[7, 3, 8, 20, 31, 4]])
    batch = torch.full((2, 6), pad)
    batch[0, 3:], batch[1] = short[0], long[0]
    mask = (torch.arange(6) >= torch.tensor([[3], [0]])).long()
    together = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False)
    for row, prompt in enumerate((short, long)):
        alone = model.generate(prompt, max_new_tokens=8, do_sample=False)
        assert torch.equal(together[row, -8:], alone[0, -8:])


def test_static_cache_equals_dynamic_cache(model, input_ids):
    dynamic = model.generate(input_ids, max_new_tokens=10, do_sample=False)
    static = model.generate(input_ids, max_new_tokens=10, do_sample=False, cache_implementation="static")
    assert torch.equal(static, dynamic)
