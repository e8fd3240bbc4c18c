"""A real client: Hugging Face transformers running a small randomly initialized Llama-style model
with attn_implementation="flash_attention_3" through this wrapper, against its sdpa run."""

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_llama_logits_match_sdpa():
    transformers = pytest.importorskip("transformers")
    from transformers.utils import is_flash_attn_3_available

    assert is_flash_attn_3_available(), "transformers does not see flash_attn_3 (is the distribution installed?)"
    def model(attn_implementation):
        config = transformers.LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024,
                                          num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                          max_position_embeddings=512, attn_implementation=attn_implementation)
        torch.manual_seed(0)  # the same random weights for both
        return transformers.LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()

    input_ids = torch.randint(0, 1000, (2, 200), device="cuda")
    with torch.no_grad():
        expected = model("sdpa")(input_ids).logits.float()
        logits = model("flash_attention_3")(input_ids).logits.float()
    torch.testing.assert_close(logits, expected, atol=3e-2, rtol=3e-2)
