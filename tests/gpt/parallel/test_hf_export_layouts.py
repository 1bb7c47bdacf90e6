"""Export from any layout: the final checkpoint of a 2-rank tensor-parallel, pipeline or DeepSpeed ZeRO-3 run is
exported in this one process, without the world size that wrote it: the Hugging Face tensors are the weights one
process trained (within the layouts' tolerance; the runs are test_equivalence's, trained once per session), and
transformers computes the logits gptlaunch computes from that checkpoint."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from gpt.checkpoint.writer import load_model  # noqa: E402
from gpt.export import export, hf_model  # noqa: E402
from strategy_runs import baseline_of, run  # noqa: E402

pytestmark = pytest.mark.slow  # each case trains its strategy through `python -m launch`

LAYOUTS = ["tp2_gqa", "pipeline_gpipe", "deepspeed_zero3"]


@pytest.mark.parametrize("name", LAYOUTS)
def test_a_checkpoint_of_any_layout_exports_the_weights_one_process_trained(name, tmp_path, tmp_path_factory,
                                                                            data_overrides):
    import transformers  # the hf extra; imported here, not by every test worker's collection

    baseline, _, _ = load_model(run(baseline_of(name), tmp_path_factory, data_overrides))
    trained, _, _ = load_model(run(name, tmp_path_factory, data_overrides))
    with torch.no_grad():
        export(run(name, tmp_path_factory, data_overrides), tmp_path)
        expected = hf_model(baseline, eot=None).state_dict()
    got = load_file(tmp_path / "model.safetensors")
    assert got.keys() == expected.keys()
    for key, value in expected.items():  # the tolerance of test_final_checkpoint_holds_the_same_weights
        torch.testing.assert_close(got[key], value, rtol=1e-3, atol=1e-4, msg=key)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, trained.cfg.vocab_size, (2, trained.cfg.block_size),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the same weights in both: fp32 to within the order of additions
        torch.testing.assert_close(loaded(tokens).logits, trained(tokens)[0], rtol=1e-5, atol=1e-5)
