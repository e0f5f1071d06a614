"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`, from the sdist of the installed
transformers: see `support/transformers_suite.py`) on a dense PT model and a PT-MoE model, and on Llama and Mixtral
with the same tester as the reference: a PT failure that Llama and Mixtral do not show is a defect of PT, unless the
test cannot apply to PT (skipped below, each with the reason).

The sdist has no `causal_lm_tester.py` nor the per-model test files, so `CausalLMTester` / `CausalLMCommonTest` below
stand in for transformers' `CausalLMModelTester` / `CausalLMModelTest`: random ids and a random padding mask of
`batch_size x seq_length`, a config of the tester's tiny shape, `test_config` through `ConfigTester`, and the base and
causal-LM forwards. All four models run the same tester on the classes PT has (base model, causal LM), within the
common suite's limits (at most 2 layers, under 1M parameters).

Besides the skips below, the suite skips for PT (and not for Llama or Mixtral) by its own checks:
`test_can_capture_specific_layers_hidden_states` (PT records hidden states itself, the mean of the tracks, not
through `_can_record_outputs`), `test_tp_plan_matches_params` (PT has no DTensor tensor-parallel plan: its tracks are
its parallelism, see `distributed_ptt`), and for PT-MoE `test_reverse_loading_mapping` and
`test_can_load_from_already_mapped_keys` (PT has no checkpoint conversion mapping: its checkpoints are saved in its
own layout).
"""

import functools
import re
import unittest
from unittest import mock

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, MixtralConfig, MixtralForCausalLM, MixtralModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

import transformers_suite
from modeling_ptt import PTConfig, PTForCausalLM, PTModel


transformers_suite.load()
from transformers_tests.test_configuration_common import ConfigTester  # noqa: E402
from transformers_tests.test_modeling_common import (  # noqa: E402
    GenerationTesterMixin,
    ModelTesterMixin,
    ids_tensor,
    random_attention_mask,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models are tiny (width 32, 7 tokens): a second thread adds only its synchronisation, which made this module
    several times slower on two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class CausalLMTester:
    """The model tester of a decoder-only LM: `config_kwargs` of the class plus the common shape below."""

    config_class = None
    base_model_class = None
    causal_lm_class = None
    config_kwargs: dict = {}

    def __init__(self, parent, batch_size: int = 13, seq_length: int = 7, is_training: bool = True):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_input_mask = True
        shape = dict(
            vocab_size=99, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, hidden_act="silu", max_position_embeddings=512, initializer_range=0.02,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
        self.config_values = {**shape, **self.config_kwargs}
        for name, value in self.config_values.items():
            setattr(self, name, value)
        self.all_model_classes = (self.base_model_class, self.causal_lm_class)

    def get_config(self):
        return self.config_class(**self.config_values)

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_mask = random_attention_mask([self.batch_size, self.seq_length]) if self.use_input_mask else None
        token_labels = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        return self.get_config(), input_ids, input_mask, token_labels

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, input_mask, _ = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": input_mask}


class CausalLMCommonTest(ModelTesterMixin, GenerationTesterMixin):
    model_tester_class = None
    # `test_can_init_all_missing_weights` (every weight re-initialised by `_init_weights` from the meta device) runs
    # for models whose config file carries a copyright year of 2023 or later, else only with this flag; PT's has none
    test_can_init_all_missing_weights_before_2023 = True
    # test name (a parameterized test's name without its case suffix) -> why it cannot apply to this model (skipped)
    not_applicable: dict[str, str] = {}
    # test name -> the defect outside this package that fails it (expected to fail; a pass is reported, not an error)
    known_failures: dict[str, str] = {}

    @staticmethod
    def matches(name: str, test_name: str) -> bool:
        return re.fullmatch(rf"{name}(_\d+(_\w+)?)?", test_name) is not None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for test_name in dir(cls):
            reason = next((why for name, why in cls.known_failures.items() if cls.matches(name, test_name)), None)
            if reason is not None:  # marked on a copy: the function itself is every test class's
                test = getattr(cls, test_name)
                setattr(cls, test_name, pytest.mark.xfail(reason=reason)(functools.wraps(test)(
                    lambda self, *args, _test=test, **kwargs: _test(self, *args, **kwargs))))

    def setUp(self):
        for name, reason in self.not_applicable.items():
            if self.matches(name, self._testMethodName):
                self.skipTest(reason)
        self.model_tester = self.model_tester_class(self)
        self.all_model_classes = self.model_tester.all_model_classes
        self.config_tester = ConfigTester(
            self, config_class=self.model_tester.config_class, **self.model_tester.config_values
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        config, input_ids, input_mask, _ = self.model_tester.prepare_config_and_inputs()
        model = self.model_tester.base_model_class(config).eval()
        with torch.no_grad():
            result = model(input_ids, attention_mask=input_mask)
        tester = self.model_tester
        self.assertEqual(result.last_hidden_state.shape, (tester.batch_size, tester.seq_length, tester.hidden_size))

    def test_causal_lm(self):
        config, input_ids, input_mask, token_labels = self.model_tester.prepare_config_and_inputs()
        model = self.model_tester.causal_lm_class(config).eval()
        with torch.no_grad():
            result = model(input_ids, attention_mask=input_mask, labels=token_labels)
        tester = self.model_tester
        self.assertEqual(result.logits.shape, (tester.batch_size, tester.seq_length, tester.vocab_size))
        self.assertTrue(torch.isfinite(result.loss))


class PTModelTester(CausalLMTester):
    """Dense PT: 2 tracks of 2 query heads and 1 KV head each, both layers in one block (a hidden state inside a
    block is the mean of the tracks, the one after it the merge)."""

    config_class, base_model_class, causal_lm_class = PTConfig, PTModel, PTForCausalLM
    config_kwargs = dict(num_tracks=2, track_block_depth=2)


class PTMoeModelTester(CausalLMTester):
    """PT-MoE with AFM's options in two layers (tests/helpers.py's AFM_OPTIONS, configuration/ptt-tiny-moe.json): a
    sliding-window RoPE layer with a dense FFN, then a global NoPE layer with per-track experts; QK-norm; a merge
    after every layer."""

    config_class, base_model_class, causal_lm_class = PTConfig, PTModel, PTForCausalLM
    config_kwargs = dict(
        num_tracks=2, track_block_depth=1, qk_norm=True, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], no_rope_layers=[1, 0], mlp_layer_types=["dense", "sparse"],
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
    )


class LlamaModelTester(CausalLMTester):
    config_class, base_model_class, causal_lm_class = LlamaConfig, LlamaModel, LlamaForCausalLM


class MixtralModelTester(CausalLMTester):
    config_class, base_model_class, causal_lm_class = MixtralConfig, MixtralModel, MixtralForCausalLM
    config_kwargs = dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)


class PTCommonTest(CausalLMCommonTest):
    """The common tests tell a base model from a head, and give a causal LM labels, by looking its class name up in
    transformers' own tables of model names (`MODEL_MAPPING_NAMES`, `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), where
    every model in transformers is listed and an out-of-tree one cannot be (`AutoModel.register` fills the Auto
    classes, not these tables). PT's names are entered there for the test's duration, as Llama's and Mixtral's are."""

    def setUp(self):
        for table, name in ((MODEL_MAPPING_NAMES, "PTModel"), (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "PTForCausalLM")):
            patcher = mock.patch.dict(table, {PTConfig.model_type: name})
            patcher.start()
            self.addCleanup(patcher.stop)
        super().setUp()


# A dense PT model is built by the class that also builds PT-MoE, whose config has the MoE fields and whose module has
# the experts: the tests that find a MoE by those have nothing to test without a sparse layer.
NO_SPARSE_LAYER = "the dense PT config has no sparse layer, so there is no router and no expert in the model"


class PTModelTest(PTCommonTest, unittest.TestCase):
    model_tester_class = PTModelTester
    not_applicable = {
        # a class whose module uses `@use_experts_implementation` is taken to have experts in every config
        "test_eager_matches_batched_and_grouped_inference": f"{NO_SPARSE_LAYER}: no experts kernel (eager, "
        "batched_mm, grouped_mm) is ever called; PTMoeModelTest runs it on PT's experts",
        # a config with `output_router_logits` is taken to have routers
        "test_output_router_logits_from_config": f"{NO_SPARSE_LAYER}: there are no router logits to return (PTModel "
        "returns an empty tuple, PTForCausalLM a CausalLMOutputWithPast, as documented); PTConfig has "
        "`output_router_logits` for PT-MoE, and PTMoeModelTest runs this test",
    }


class PTMoeModelTest(PTCommonTest, unittest.TestCase):
    model_tester_class = PTMoeModelTester


class LlamaModelTest(CausalLMCommonTest, unittest.TestCase):
    model_tester_class = LlamaModelTester


class MixtralModelTest(CausalLMCommonTest, unittest.TestCase):
    model_tester_class = MixtralModelTester
    known_failures = dict.fromkeys(
        ["test_model_rope_scaling_frequencies", "test_model_rope_scaling_from_config_1_dynamic",
         "test_model_rope_scaling_from_config_2_yarn"],
        "transformers: MixtralConfig leaves head_dim None (its default), which the dynamic and YaRN RoPE inits read "
        "as the head size (`None * partial_rotary_factor`: TypeError)",
    )
