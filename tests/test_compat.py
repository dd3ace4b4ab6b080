"""The cache keyword of the installed transformers (``cache=`` from 5.24, ``past_key_values=`` before).

CI runs this file on 5.24 (the new keyword), 5.23 (the last release before the rename) and 5.4.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import transformers
from conftest import prompt_ids, tiny_model
from packaging.version import Version
from transformers import DynamicCache

from kvcache_plugins import MixedPrecisionCache, cache_kwargs
from kvcache_plugins._compat import NEW_NAME, OLD_NAME, cache_keyword, output_cache

RENAMED = Version(Version(transformers.__version__).base_version) >= Version("5.24.0")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_the_keyword_of_the_installed_release(model):
    assert cache_keyword(model) == (NEW_NAME if RENAMED else OLD_NAME)
    assert cache_kwargs(model, "c") == {cache_keyword(model): "c"}
    # wrappers are looked through
    assert cache_keyword(torch.nn.DataParallel(model)) == cache_keyword(model)


def test_forward_with_the_helper_fills_the_given_cache_without_warnings(model):
    ids = prompt_ids(1, 9)
    cache = MixedPrecisionCache(model, "full")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            out = model(ids, **cache_kwargs(model, cache), use_cache=True)
    assert cache.get_seq_length() == 9
    assert output_cache(out) is cache


def test_generate_with_the_helper_uses_the_given_cache(model):
    ids = prompt_ids(1, 9)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), max_new_tokens=3,
                             do_sample=False)
    assert cache.get_seq_length() == out.shape[1] - 1


def test_why_the_keyword_is_chosen_per_release(model):
    """From 5.24 the old keyword warns; before 5.24 ``forward(cache=...)`` is silently ignored (a fresh cache is used)."""
    if RENAMED:
        with pytest.warns(FutureWarning, match="past_key_values"), torch.no_grad():
            model(prompt_ids(1, 9), past_key_values=DynamicCache(config=model.config), use_cache=True)
    else:
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            out = model(prompt_ids(1, 9), cache=cache, use_cache=True)
        assert cache.get_seq_length() == 0 and output_cache(out) is not cache


@pytest.mark.parametrize("given", [OLD_NAME, NEW_NAME])
def test_lm_eval_generation_kwargs_may_not_carry_a_cache(model, given):
    """With cache=<spec> the lm-eval model supplies every generate call's cache; one in gen_kwargs is refused
    (on 5.24 a user's ``cache`` would otherwise silently replace ours)."""
    from kvcache_plugins.eval.lm_eval_model import _wrap_model_generate
    from kvcache_plugins.specs import parse_spec

    calls = []

    def original(self, context, max_length, stop, **kwargs):
        calls.append(kwargs)

    lm = types.SimpleNamespace(_kv_spec=parse_spec("full"), model=model)
    generate = _wrap_model_generate(original)
    ids = prompt_ids(1, 5)
    with pytest.raises(ValueError, match=f"remove {given} .*neither 'past_key_values' nor 'cache'"):
        generate(lm, ids, 10, ["\n"], **{given: DynamicCache()})
    generate(lm, ids, 10, ["\n"], attention_mask=torch.ones_like(ids))
    (kwargs,) = calls
    assert isinstance(kwargs[cache_keyword(model)], DynamicCache) and {OLD_NAME, NEW_NAME} & set(kwargs) == {
        cache_keyword(model)
    }
